"""The project against the reference trainer (TRL 0.11.4's legacy PPOTrainer), same work, same machine.

    bash benchmarks/setup_reference_env.sh          # once: the reference's own venv
    python benchmarks/compare.py --markdown benchmarks/results.md

For each seed it runs, one after the other (never both at once: they would share the cores),

- the project: ``python -m learner.main --config CONFIG --run.steps N --run.seed S --out-dir TMP``
  (HF_HUB_OFFLINE=1), whose ``stats.jsonl`` gives the per-step times and rewards;
- the reference: ``benchmarks/reference_trl.py`` under the reference venv's python, with the
  same config, steps, seed and extra settings;

then prints a table: samples per second of each (the first step of every run, a warm-up, is left
out), the ratio project / reference, the time of each phase (generate, score, update), and the mean
reward of the last 5 steps for each seed with its mean and spread over seeds. ``--markdown FILE``
writes the same as markdown, with the machine, for BENCHMARKS.md. Both trainers run in fp32 (the
only precision either has on CPU). Which of the two goes first alternates from seed to seed, so a
drift in the machine's load does not favour one of them.

Tiny smoke run (a couple of minutes):

    python benchmarks/compare.py --steps 2 --seeds 0 \\
        --extra-args "--ppo.batch_size 32 --ppo.mini_batch_size 32"
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV = REPO / "benchmarks" / ".venv-trl"
PHASES = ("generate", "score", "update")
# Lines of the children's output worth echoing as progress; the rest goes to the log files.
PROGRESS = re.compile(r"^(step \d|error|reference|Ray dashboard|tuned policy|Traceback|\w*Error)")


@dataclass
class RunResult:
    """One trainer's run for one seed."""

    trainer: str
    seed: int
    rows: list[dict[str, Any]]
    """per-step statistics, in order"""
    batch_size: int
    wall_seconds: float
    """the whole subprocess: imports, Ray start-up, model loading, every step, saving"""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def timed(self) -> list[dict[str, Any]]:
        """The steps that count for speed: all but the first (warm-up), unless there is only one."""
        return self.rows[1:] if len(self.rows) > 1 else self.rows

    @property
    def samples_per_second(self) -> float:
        return self.batch_size * len(self.timed) / sum(r["time/step"] for r in self.timed)

    def phase(self, name: str) -> float:
        """Mean seconds per step of a phase; 'step' is the whole step, 'other' what the phases leave."""
        if name == "other":
            return self.phase("step") - sum(self.phase(p) for p in PHASES)
        return statistics.fmean(r[f"time/{name}"] for r in self.timed)

    @property
    def reward_last5(self) -> float:
        return statistics.fmean(r["env/reward_mean"] for r in self.rows[-5:])


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    cpu = cpu_model()
    import torch

    try:
        import transformers
        tf = transformers.__version__
    except ImportError:
        tf = "?"
    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = "?"
    return {"cores": os.cpu_count(), "cpu": cpu,
            "torch": torch.__version__, "transformers": tf, "ray": ray_version,
            "python": platform.python_version(), "platform": platform.platform()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def stream(cmd: list[str], env: dict[str, str], log: Path, tag: str) -> tuple[int, float]:
    """Runs a child process, writes all its output to `log`, echoes the progress lines."""
    t0 = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                f.write(line)
                clean = re.sub(r"\x1b\[[0-9;]*m", "", line).strip()
                if PROGRESS.match(clean):
                    print(f"  [{tag}] {clean}", flush=True)
            rc = proc.wait()
        except BaseException:
            proc.terminate()
            proc.wait(timeout=30)
            raise
    return rc, time.perf_counter() - t0


def fail(what: str, log: Path) -> None:
    tail = log.read_text().splitlines()[-30:]
    sys.exit(f"error: {what} failed; last lines of {log}:\n" + "\n".join(tail))


def run_project(args: argparse.Namespace, seed: int, work: Path) -> RunResult:
    out_dir = work / f"project-seed{seed}"
    cmd = [sys.executable, "-m", "learner.main", "--config", args.config, "--run.steps", str(args.steps),
           "--run.seed", str(seed), "--out-dir", str(out_dir), "--run.name", "run",
           *shlex.split(args.extra_args), *shlex.split(args.project_args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    print(f"project, seed {seed}: {shlex.join(cmd)}", flush=True)
    log = work / f"project-seed{seed}.log"
    rc, wall = stream(cmd, env, log, f"project s{seed}")
    if rc != 0:
        fail(f"project run (seed {seed}, exit {rc})", log)
    run_dir = out_dir / "run"
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return RunResult("project", seed, rows, int(cfg["ppo"]["batch_size"]), wall,
                     {"cluster": cfg.get("cluster", {}), "ppo": cfg.get("ppo", {})})


def run_reference(args: argparse.Namespace, seed: int, work: Path) -> RunResult:
    out = work / f"reference-seed{seed}.jsonl"
    cmd = [str(args.python), str(REPO / "benchmarks" / "reference_trl.py"), "--config", args.config,
           "--steps", str(args.steps), "--seed", str(seed), "--threads", str(args.threads), "--out", str(out),
           *shlex.split(args.extra_args), *shlex.split(args.reference_args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONPATH", None)  # the reference venv sees nothing of the project's environment
    print(f"reference, seed {seed}: {shlex.join(cmd)}", flush=True)
    log = work / f"reference-seed{seed}.log"
    rc, wall = stream(cmd, env, log, f"reference s{seed}")
    if rc != 0:
        fail(f"reference run (seed {seed}, exit {rc})", log)
    lines = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    summary = next(x for x in lines if x.get("summary"))
    rows = [x for x in lines if not x.get("summary")]
    return RunResult("reference", seed, rows, int(summary["batch_size"]), wall, summary)


def mean_sd(xs: list[float], fmt: str = "{:.2f}") -> str:
    """'mean ± sd (min..max)' over seeds; just the value for one seed."""
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (f"{fmt.format(statistics.fmean(xs))} ± {fmt.format(statistics.stdev(xs)).lstrip('+')} "
            f"({fmt.format(min(xs))}..{fmt.format(max(xs))})")


def tables(proj: list[RunResult], ref: list[RunResult]) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """(header, rows) of the speed table and of the per-seed table."""
    n_timed = len(proj[0].timed)
    warm = "without the first step" if n_timed < len(proj[0].rows) else "all steps"
    speed_head = ["", "project", "reference", "project / reference"]
    sps_p = [r.samples_per_second for r in proj]
    sps_r = [r.samples_per_second for r in ref]
    ratios = [p / r for p, r in zip(sps_p, sps_r)]
    speed = [[f"samples/s ({warm}, {n_timed} step{'s' if n_timed != 1 else ''} per run)", mean_sd(sps_p), mean_sd(sps_r), mean_sd(ratios)]]
    names = {"step": "seconds per step", "generate": "  generate", "score": "  score", "update": "  update",
             "other": "  other (step − the three)"}
    for name, label in names.items():
        p = statistics.fmean(r.phase(name) for r in proj)
        q = statistics.fmean(r.phase(name) for r in ref)
        speed.append([label, f"{p:.3f}", f"{q:.3f}", f"{p / q:.2f}" if q > 1e-9 else "–"])
    speed.append(["wall time per run, start-up included (s)", f"{statistics.fmean(r.wall_seconds for r in proj):.1f}",
                  f"{statistics.fmean(r.wall_seconds for r in ref):.1f}", ""])
    seed_head = ["seed", "project samples/s", "reference samples/s", "ratio",
                 "project reward, last 5 steps", "reference reward, last 5 steps"]
    seeds = [[str(p.seed), f"{p.samples_per_second:.2f}", f"{r.samples_per_second:.2f}",
              f"{p.samples_per_second / r.samples_per_second:.2f}", f"{p.reward_last5:+.3f}", f"{r.reward_last5:+.3f}"]
             for p, r in zip(proj, ref)]
    if len(proj) > 1:
        seeds.append(["mean ± sd (min..max)", mean_sd(sps_p), mean_sd(sps_r), mean_sd(ratios),
                      mean_sd([p.reward_last5 for p in proj], "{:+.3f}"),
                      mean_sd([r.reward_last5 for r in ref], "{:+.3f}")])
    return speed_head, speed, seed_head, seeds


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(c.strip() for c in row) + " |" for row in rows]
    return "\n".join(out)


def markdown(args: argparse.Namespace, m: dict[str, Any], proj: list[RunResult], ref: list[RunResult],
             tabs: tuple, load: tuple[str, str], command: str) -> str:
    r0 = ref[0].info
    p0 = proj[0].info
    ppo = p0.get("ppo", {})
    cluster = p0.get("cluster", {})
    return "\n".join([
        "## Speed against the reference trainer",
        "",
        f"Project (Ray actor/learner, `python -m learner.main`) against TRL {r0.get('trl')}'s legacy `PPOTrainer` "
        f"(`benchmarks/reference_trl.py`, one process, batched generation of the whole batch in one `generate` call), "
        f"the same work: `{args.config}`, {args.steps} steps, seeds {', '.join(map(str, args.seeds))}, "
        f"batch {ppo.get('batch_size')} (minibatch {ppo.get('mini_batch_size')}, {ppo.get('ppo_epochs')} PPO epochs), "
        f"fp32 on CPU" + (f", extra settings `{args.extra_args}`" if args.extra_args else "")
        + (f", project only `{args.project_args}`" if args.project_args else "")
        + (f", reference only `{args.reference_args}`" if args.reference_args else "") + ".",
        "",
        f"- machine: {m['cores']} cores (`os.cpu_count()`), {m['cpu']}; {m['platform']}",
        f"- project: torch {m['torch']}, transformers {m['transformers']}, Ray {m['ray']}, Python {m['python']}; "
        f"{cluster.get('num_rollout_workers')} rollout actors, {cluster.get('num_reward_workers')} reward actor, "
        f"torch threads {cluster.get('torch_threads') or 'auto (cluster.torch_threads 0)'}",
        f"- reference: torch {r0.get('torch')}, transformers {r0.get('transformers')}, TRL {r0.get('trl')}, "
        f"{r0.get('threads')} torch threads",
        f"- load average before / after: {load[0]} / {load[1]}",
        f"- command: `{command}`",
        "",
        md_table(tabs[0], tabs[1]),
        "",
        "Per-phase times are means per step over all runs (first step of each run left out). The project's "
        "generate and score are those of its slowest rollout actor (the actors generate their shards at the "
        "same time); its update is the learner's whole PPO step (no-grad passes and the epochs), as is the "
        "reference's (`PPOTrainer.step`). 'other' is the rest of the step: for the project the weight broadcast "
        "and Ray's calls, for the reference building the queries.",
        "",
        md_table(tabs[2], tabs[3]),
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/stand-in.yaml", help="settings file, relative to the repo root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: the config's run.steps)")
    parser.add_argument("--threads", type=int, default=2, help="the reference's torch threads (default 2)")
    parser.add_argument("--python", type=Path, default=DEFAULT_VENV / "bin" / "python",
                        help="the reference venv's python (setup_reference_env.sh)")
    parser.add_argument("--extra-args", default="",
                        help="settings passed to both trainers, e.g. '--ppo.batch_size 32 --ppo.mini_batch_size 32'")
    parser.add_argument("--project-args", default="", help="settings for the project only (e.g. '--cluster.num_rollout_workers 1')")
    parser.add_argument("--reference-args", default="", help="settings for the reference only")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders and logs (default: a new temp dir)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results as markdown here")
    parser.add_argument("--json", type=Path, default=None, help="write every run's per-step rows here")
    args = parser.parse_args(argv)

    if args.steps is None:
        cfg_path = Path(args.config) if Path(args.config).is_absolute() else REPO / args.config
        args.steps = int(((yaml.safe_load(cfg_path.read_text()) or {}).get("run") or {}).get("steps") or 0)
        if args.steps <= 0:
            parser.error(f"{args.config} sets no run.steps: give --steps")
    if not args.python.exists():
        parser.error(f"no reference python at {args.python}: run bash benchmarks/setup_reference_env.sh")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    m = machine()
    load_before = loadavg()
    print(f"machine: {m['cores']} cores, {m['cpu']}; torch {m['torch']}; load average {load_before}", flush=True)
    if float(load_before.split()[0]) > 0.5 * (m["cores"] or 1):
        print(f"warning: load average {load_before.split()[0]} on {m['cores']} cores before starting: other work "
              "shares the cores and the timings will show it", flush=True)
    print(f"{len(args.seeds)} seeds x 2 trainers, {args.steps} steps each; logs and runs in {work}", flush=True)

    proj: list[RunResult] = []
    ref: list[RunResult] = []
    t0 = time.perf_counter()
    for i, seed in enumerate(args.seeds):
        order = (run_project, run_reference) if i % 2 == 0 else (run_reference, run_project)
        for run in order:
            result = run(args, seed, work)
            (proj if result.trainer == "project" else ref).append(result)
            print(f"  -> {result.trainer} seed {seed}: {result.samples_per_second:.2f} samples/s, reward last 5 "
                  f"steps {result.reward_last5:+.3f}, {result.wall_seconds:.0f}s in all "
                  f"({time.perf_counter() - t0:.0f}s elapsed)", flush=True)
    load_after = loadavg()

    tabs = tables(proj, ref)
    print()
    print(text_table(tabs[0], tabs[1]))
    print()
    print(text_table(tabs[2], tabs[3]))
    print(f"\nload average before / after: {load_before} / {load_after}; runs and logs in {work}")
    if args.markdown:
        args.markdown.write_text(markdown(args, m, proj, ref, tabs, (load_before, load_after), command))
        print(f"markdown written to {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "args": {k: str(v) for k, v in vars(args).items()},
                                         "runs": [vars(r) for r in proj + ref]}, indent=1, default=str))
        print(f"json written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
