"""Samples per second with 1, 2 and 4 rollout actors on a simulated multi-node cluster.

    python benchmarks/scaling.py [--workers 1 2 4] [--steps 6] [--markdown FILE]

Starts three Ray nodes on this machine (``ray start`` on 127.0.0.1, token auth, 4 logical
CPUs each: the same cluster as tests/test_cluster.py, whose LocalCluster it reuses), then runs
the driver against it (``--address``) with the stand-in settings (configs/stand-in.yaml,
batch 128) and SPREAD placement for each number of rollout actors. Reports the mean over the
steps after the first of samples/s and of each phase's time.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from localcluster import LocalCluster, started_cluster  # noqa: E402

NODES = 3


def run(cluster: LocalCluster, workers: int, steps: int, out: Path) -> dict:
    cmd = [sys.executable, "-m", "learner.main", "--config", "configs/stand-in.yaml", "--address", cluster.gcs_address,
           "--run.steps", str(steps), "--cluster.num_rollout_workers", str(workers),
           "--cluster.placement_strategy", "SPREAD", "--run.report_queries", "0", "--run.checkpoint_every", "0",
           "--out-dir", str(out), "--run.name", f"w{workers}"]
    proc = subprocess.run(cmd, cwd=REPO, env=cluster.env, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{workers} workers failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    stats = [json.loads(line) for line in (out / f"w{workers}" / "stats.jsonl").read_text().splitlines()][1:]
    mean = lambda key: statistics.mean(s[key] for s in stats)  # noqa: E731
    nodes = {a["node_id"] for name, a in json.loads((out / f"w{workers}" / "actors.json").read_text()).items()
             if name.startswith("rollout")}
    return {"workers": workers, "nodes": len(nodes), "samples_per_second": mean("samples_per_second"),
            "generate": mean("time/generate"), "score": mean("time/score"), "rollout": mean("time/rollout"),
            "update": mean("time/update"), "broadcast": mean("time/broadcast"), "step": mean("time/step")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="rollout actor counts to measure")
    ap.add_argument("--steps", type=int, default=6, help="PPO steps per run (the first is not timed)")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args()
    rows = []
    with started_cluster("rays-", nodes=NODES) as cluster:
        for n in args.workers:
            rows.append(run(cluster, n, args.steps, cluster.root / "runs"))
            r = rows[-1]
            print(f"{n} rollout actors on {r['nodes']} nodes: {r['samples_per_second']:.1f} samples/s  "
                  f"step {r['step']:.2f}s = broadcast {r['broadcast']:.2f} + rollout {r['rollout']:.2f} "
                  f"(generate {r['generate']:.2f}, score {r['score']:.2f}) + update {r['update']:.2f}", flush=True)
    if args.markdown:
        lines = [f"{NODES} Ray nodes on one machine ({os.cpu_count()} cores), stand-in settings, batch 128, "
                 f"SPREAD; means over steps 2..{args.steps}", "",
                 "| rollout actors | nodes used | samples/s | step s | broadcast s | rollout s (generate, score) | update s |",
                 "| ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
        for r in rows:
            lines.append(f"| {r['workers']} | {r['nodes']} | {r['samples_per_second']:.1f} | {r['step']:.2f} | "
                         f"{r['broadcast']:.2f} | {r['rollout']:.2f} ({r['generate']:.2f}, {r['score']:.2f}) | "
                         f"{r['update']:.2f} |")
        args.markdown.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
