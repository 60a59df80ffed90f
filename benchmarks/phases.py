"""The system's step against the sum of its parts run alone, phase by phase.

    python benchmarks/phases.py --config configs/stand-in.yaml --steps 12
    python benchmarks/phases.py --policy gpt2-small --steps 4 -- --ppo.batch_size 16 --ppo.mini_batch_size 16

Two runs of the same settings, one after the other (never at once: they share the cores):

- **alone**: the plain classes without Ray: ``RolloutWorker.generate`` for each shard (the rollout
  actors' torch threads), ``SentimentScorer.score`` of the whole batch (the reward actor's
  threads), ``LearnerActor.step`` on every learner rank (rank 0 in this process, the others in
  processes of their own, one DDP group over gloo, each with a rank's threads) and the in-process
  weight hand-over (rank 0's ``weights()`` then ``load_weights`` into each worker). The data stream, seeds and thread
  counts are the ones ``python -m learner.main`` gives its actors;
- **system**: ``python -m learner.main`` with the same settings; its ``stats.jsonl`` gives the
  driver's phase times.

It prints, per phase, the median seconds of both (the first step of each run, a warm-up, left
out; ``--rounds N`` alternates the two N times and pools their steps) and the
system's step against the sum of the parts alone: what is lost between the phases. ``--policy
gpt2-small`` swaps in a GPT-2-small-sized policy (GPT2Config() defaults, 124M parameters, random
weights: the hub is unreachable here) with the stand-in's tokenizer, saved to a temporary folder.
Settings after ``--`` go to both runs, in ``learner.main``'s spelling. ``--json FILE`` keeps the
per-step rows.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PHASES = ("broadcast", "generate", "score", "update")


def _peer_rank(cfg, rank: int, address: tuple[str, int], torch_threads: int, conn) -> None:
    """A learner rank beyond rank 0 in its own process (a Ray actor in the system): joins the
    ranks' group, then runs ``step`` on each batch rank 0 sends until it sends None."""
    from learner.core.actor import LearnerActor

    world = cfg.cluster.learner_processes
    learner = LearnerActor(cfg.policy, cfg.ppo, seed=cfg.run.seed, torch_threads=torch_threads, rank=rank,
                           world=world, rollout_dtype=cfg.rollout.dtype)
    learner.join(address, min(cfg.cluster.call_timeout_s, 120.0))
    conn.send("joined")
    while (batch := conn.recv()) is not None:
        learner.step(*batch)
        conn.send("stepped")
    learner.close()


class AloneLearner:
    """The learner's ranks as the system has them, without Ray: rank 0 in this process, the
    others in processes of their own, one DDP group, each rank with the system's thread count."""

    def __init__(self, cfg) -> None:
        import multiprocessing

        from learner.core.actor import LearnerActor
        from learner.orchestration.placement import threads

        world = cfg.cluster.learner_processes
        self.rank_threads = max(1, threads(cfg)[0] // world)  # as spawn_learner gives each rank
        self.rank0 = LearnerActor(cfg.policy, cfg.ppo, seed=cfg.run.seed, torch_threads=self.rank_threads,
                                  rank=0, world=world, rollout_dtype=cfg.rollout.dtype)
        self.peers = []
        if world > 1:
            address = self.rank0.rendezvous()
            ctx = multiprocessing.get_context("spawn")
            for rank in range(1, world):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=_peer_rank, args=(cfg, rank, address, self.rank_threads, theirs), daemon=True)
                proc.start()
                self.peers.append((proc, ours))
            # A peer that dies before joining leaves rank 0 waiting: not for the run's whole timeout.
            self.rank0.join(address, min(cfg.cluster.call_timeout_s, 120.0))
            for _, conn in self.peers:
                conn.recv()

    def step(self, queries, responses, scores) -> dict[str, float]:
        """Every rank steps on the same batch at once; rank 0's statistics (the whole batch's)."""
        import torch

        for _, conn in self.peers:
            conn.send((queries, responses, scores))
        torch.set_num_threads(self.rank_threads)
        stats = self.rank0.step(queries, responses, scores)
        for _, conn in self.peers:
            conn.recv()
        return stats

    def close(self) -> None:
        for proc, conn in self.peers:
            conn.send(None)
            proc.join(timeout=60)
        self.rank0.close()


def run_alone(cfg, steps: int) -> list[dict[str, float]]:
    """The step's parts without Ray, each timed alone, with the system's thread counts."""
    import torch

    from learner.orchestration.data import PromptStream, load_texts
    from learner.orchestration.driver import shard_bounds
    from learner.core.models import load_tokenizer
    from learner.orchestration.placement import threads
    from actors.rollout import RolloutWorker
    from rewards.scorer import SentimentScorer

    learner_threads, rollout_threads = threads(cfg)
    n = cfg.cluster.num_rollout_workers
    stream = PromptStream(load_texts(cfg.data.dataset, cfg.data.split, cfg.data.text_column),
                          load_tokenizer(cfg.policy), cfg.data, cfg.ppo.batch_size, cfg.run.seed)
    workers = [RolloutWorker(cfg.rollout.for_actor(seed=cfg.run.seed, torch_threads=rollout_threads))
               for _ in range(n)]
    scorer = SentimentScorer(cfg.reward.for_actor(torch_threads=learner_threads))
    learner = AloneLearner(cfg)
    shards = shard_bounds(cfg.ppo.batch_size, n)
    rows = []
    for step in range(steps):
        torch.set_num_threads(learner_threads)
        t0 = time.perf_counter()
        version, weights = learner.rank0.weights()
        loads = []
        for w in workers:  # the actors load at the same time in the system: the slowest counts
            t = time.perf_counter()
            w.load_weights(weights, version)
            loads.append(time.perf_counter() - t)
        broadcast = time.perf_counter() - t0 - sum(loads) + max(loads)
        queries = stream.next_batch()
        torch.set_num_threads(rollout_threads)
        rollouts, gens = [], []
        for i, (a, b) in enumerate(shards):  # concurrent in the system: the slowest shard counts
            t = time.perf_counter()
            rollouts.append(workers[i].generate(queries[a:b], step, i))
            gens.append(time.perf_counter() - t)
        torch.set_num_threads(learner_threads)
        t = time.perf_counter()
        scores = scorer.score([text for ro in rollouts for text in ro.texts])
        score = time.perf_counter() - t
        t = time.perf_counter()
        stats = learner.step(queries, [r for ro in rollouts for r in ro.responses], scores)
        update = time.perf_counter() - t
        rows.append({"step": step, "time/broadcast": broadcast, "time/generate": max(gens), "time/score": score,
                     "time/update": update, "time/learner/forward": stats["time/learner/forward"],
                     "time/learner/update": stats["time/learner/update"], "env/reward_mean": stats["env/reward_mean"]})
        print(f"  [alone] step {step + 1}/{steps}  " + "  ".join(f"{p} {rows[-1]['time/' + p]:.3f}s" for p in PHASES),
              flush=True)
    learner.close()
    return rows


def run_system(settings: list[str], steps: int, work: Path) -> list[dict[str, Any]]:
    cmd = [sys.executable, "-m", "learner.main", *settings, "--run.steps", str(steps), "--run.report_queries", "0",
           "--run.checkpoint_every", "0", "--out-dir", str(work), "--run.name", "system"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    print(f"system: {shlex.join(cmd)}", flush=True)
    with (work / "system.log").open("w") as log:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"error: the system run failed (exit {rc}); see {work / 'system.log'}")
    return [json.loads(line) for line in (work / "system" / "stats.jsonl").read_text().splitlines() if line.strip()]


def median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(alone: list[dict], system: list[dict]) -> dict[str, float]:
    out = {f"alone/{p}": median(alone, f"time/{p}") for p in PHASES}
    out.update({f"system/{p}": median(system, f"time/{p}") for p in PHASES})
    out["alone/sum"] = sum(out[f"alone/{p}"] for p in PHASES)
    out["system/step"] = median(system, "time/step")
    out["system/rollout"] = median(system, "time/rollout")
    out["overhead"] = out["system/step"] - out["alone/sum"]
    out["overhead_share"] = out["overhead"] / out["system/step"]
    return out


def parse_cli(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's flags, checked, and the settings after ``--`` (for both runs, in learner.main's spelling)."""
    settings = argv[argv.index("--") + 1:] if "--" in argv else []
    ours = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Settings after -- go to both runs, e.g. -- --ppo.batch_size 16")
    parser.add_argument("--config", default="configs/stand-in.yaml", help="settings file (default: the stand-ins)")
    parser.add_argument("--steps", type=int, default=12, help="steps of each run; the first is left out (default 12)")
    parser.add_argument("--policy", default=None,
                        help="'gpt2-small' for a random 124M policy, or a policy folder (default: the config's)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternate alone and system this many times and pool the steps: this machine's speed "
                             "drifts from minute to minute, and alternating spreads the drift over both (default 1)")
    parser.add_argument("--only", choices=("alone", "system"), default=None, help="run one side only")
    parser.add_argument("--json", type=Path, default=None, help="write both runs' per-step rows here")
    args = parser.parse_args(ours)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is a warm-up)")
    return args, settings


def load_config(args: argparse.Namespace, settings: list[str], work: Path) -> tuple[Any, list[str]]:
    """The runs' config and the flags that give it to learner.main: ``--config``, the settings after
    ``--`` and, with ``--policy``, that policy (the random GPT-2-small one is saved under `work`)."""
    from learner.config import ConfigError, parse_args, resolve_local_paths

    full = ["--config", args.config, *settings]
    try:
        cfg = resolve_local_paths(parse_args(full))
    except (ConfigError, SystemExit) as err:
        sys.exit(f"error: {err}" if isinstance(err, ConfigError) else err.code)
    if args.policy:
        if args.policy == "gpt2-small":
            sys.path.insert(0, str(REPO / "benchmarks"))
            from gpu_check import random_gpt2_small  # the same random 124M policy as the GPU check

            policy = str(random_gpt2_small(Path(cfg.policy), work / "gpt2-small-random"))
        else:
            policy = str(Path(args.policy).resolve())
        full += ["--rollout.policy", policy]
        cfg = resolve_local_paths(parse_args(full))
    return cfg, full


def run_rounds(args: argparse.Namespace, cfg: Any, full: list[str], work: Path) -> tuple[list[dict], list[dict]]:
    """The steps alone and in the system over ``--rounds`` alternations, each run's first step
    (a warm-up) left out."""
    alone, system = [], []
    for i in range(args.rounds):
        if args.only != "system":
            alone += run_alone(cfg, args.steps)[1:]  # each round's first step warms up
        if args.only != "alone":
            (work / str(i)).mkdir()
            system += run_system(full, args.steps, work / str(i))[1:]
    return alone, system


def print_summary(alone: list[dict], system: list[dict], rounds: int) -> None:
    """The medians side by side with the overhead (when both sides ran), then each side's phases
    and the learner's forward passes and epochs."""
    if alone and system:
        r = report(alone, system)
        print(f"\n{len(alone)} steps alone, {len(system)} in the system ({rounds} round(s)), medians")
        print(f"{'phase':<10} {'alone s':>8} {'system s':>9}")
        for p in PHASES:
            print(f"{p:<10} {r[f'alone/{p}']:8.3f} {r[f'system/{p}']:9.3f}")
        print(f"{'step':<10} {r['alone/sum']:8.3f} {r['system/step']:9.3f}   "
              f"overhead {r['overhead']:+.3f}s ({100 * r['overhead_share']:.1f}% of the system's step)")
    for name, rows in (("alone", alone), ("system", system)):
        if rows:
            print(f"{name}: " + "  ".join(f"{p} {median(rows, 'time/' + p):.3f}s" for p in PHASES)
                  + f"  learner forward {median(rows, 'time/learner/forward'):.3f}s"
                  + f"  learner epochs {median(rows, 'time/learner/update'):.3f}s")


def main(argv: list[str] | None = None) -> int:
    """Runs the parts alone and the system on the same settings, prints the comparison, keeps the rows."""
    args, settings = parse_cli(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)

    with tempfile.TemporaryDirectory(prefix="ppo-phases-") as tmp:
        work = Path(tmp)
        cfg, full = load_config(args, settings, work)
        import torch

        print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}; policy {cfg.policy}, "
              f"batch {cfg.ppo.batch_size}, {cfg.cluster.num_rollout_workers} rollout actors", flush=True)
        alone, system = run_rounds(args, cfg, full, work)
    print_summary(alone, system, args.rounds)
    if args.json:
        args.json.write_text(json.dumps({"policy": cfg.policy, "batch_size": cfg.ppo.batch_size, "rounds": args.rounds,
                                         "summary": report(alone, system) if alone and system else None,
                                         "alone": alone, "system": system}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
