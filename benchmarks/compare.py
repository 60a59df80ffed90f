"""The project against the reference trainer (TRL 0.11.4's legacy PPOTrainer), same work, same machine.

    bash benchmarks/setup_reference_env.sh          # once: the reference's own venv
    python benchmarks/compare.py --markdown benchmarks/results/compare.md --figure benchmarks/results/compare.png

For each seed it runs, one after the other (never two at once: they would share the cores),

- the project: ``python -m learner.main --config CONFIG --run.steps N --run.seed S --ppo.max_lag L``
  (HF_HUB_OFFLINE=1) for each L of ``--lags`` (default 0 and 1), whose ``stats.jsonl`` gives the
  per-step times and rewards;
- the reference: ``benchmarks/reference_trl.py`` under the reference venv's python, with the
  same config, steps, seed and extra settings; it saves its tuned policy.

The order alternates from seed to seed, so a drift in the machine's load favours no trainer.
Then every tuned policy, and the initial one, continues the same ``--eval-queries`` held-out
TEST-split openings (fixed ``--eval-seed``), scored by the same reward model in this process.

It prints: samples per second of each (the first step of every run, a warm-up, is left out),
the ratio to the reference, the time of each phase (generate, score, update), per seed the
training reward of the last 5 steps and the held-out reward, the held-out gains with their
spread over seeds, and whether the project's gain agrees with the reference's within that
spread. ``--markdown FILE`` writes the same as markdown, with the machine, for BENCHMARKS.md;
``--figure FILE`` draws every run's reward against seconds of training. Both trainers run in
fp32 (the only precision either has on CPU).

Tiny smoke run:

    python benchmarks/compare.py --steps 2 --seeds 0 1 --eval-queries 32 \\
        --extra-args "--ppo.batch_size 32 --ppo.mini_batch_size 32"
"""
from __future__ import annotations

import argparse
import itertools
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
    """'reference', or 'project' with its ppo.max_lag ('project', 'project max_lag=1')"""
    seed: int
    rows: list[dict[str, Any]]
    """per-step statistics, in order"""
    batch_size: int
    wall_seconds: float
    """the whole subprocess: imports, Ray start-up, model loading, every step, saving"""
    info: dict[str, Any] = field(default_factory=dict)
    policy: str | None = None
    """the tuned policy's folder (scored on held-out openings after all runs)"""
    held_out: dict[str, float] = field(default_factory=dict)
    """the tuned policy on the held-out openings: mean reward, share of positive rewards"""

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


def project_label(lag: int) -> str:
    return "project" if lag == 0 else f"project max_lag={lag}"


def run_project(args: argparse.Namespace, seed: int, work: Path, lag: int = 0) -> RunResult:
    label = project_label(lag)
    out_dir = work / f"project-lag{lag}-seed{seed}"
    cmd = [sys.executable, "-m", "learner.main", "--config", args.config, "--run.steps", str(args.steps),
           "--run.seed", str(seed), "--out-dir", str(out_dir), "--run.name", "run", "--ppo.max_lag", str(lag),
           *shlex.split(args.extra_args), *shlex.split(args.project_args)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    print(f"{label}, seed {seed}: {shlex.join(cmd)}", flush=True)
    log = work / f"project-lag{lag}-seed{seed}.log"
    rc, wall = stream(cmd, env, log, f"{label} s{seed}")
    if rc != 0:
        fail(f"{label} run (seed {seed}, exit {rc})", log)
    run_dir = out_dir / "run"
    rows = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines() if line.strip()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return RunResult(label, seed, rows, int(cfg["ppo"]["batch_size"]), wall,
                     {"cluster": cfg.get("cluster", {}), "ppo": cfg.get("ppo", {})}, policy=str(run_dir / "policy"))


def run_reference(args: argparse.Namespace, seed: int, work: Path) -> RunResult:
    out = work / f"reference-seed{seed}.jsonl"
    policy = work / f"reference-seed{seed}-policy"
    cmd = [str(args.python), str(REPO / "benchmarks" / "reference_trl.py"), "--config", args.config,
           "--steps", str(args.steps), "--seed", str(seed), "--threads", str(args.threads), "--out", str(out),
           "--save-policy", str(policy), *shlex.split(args.extra_args), *shlex.split(args.reference_args)]
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
    return RunResult("reference", seed, rows, int(summary["batch_size"]), wall, summary, policy=str(policy))


def score_held_out(args: argparse.Namespace, runs: list[RunResult]) -> dict[str, float]:
    """Every run's tuned policy, and the initial policy, on the same ``--eval-queries`` TEST-split
    openings (learner.report's recipe, seed ``--eval-seed``), sampled with the same seed and scored
    by the same reward model, in this process. Fills each run's ``held_out``; returns the initial
    policy's numbers."""
    import dataclasses

    import numpy as np

    sys.path.insert(0, str(REPO))
    from learner.config import parse_args, resolve_local_paths
    from learner.core.models import load_tokenizer
    from learner.records.report import generate_responses, held_out_queries
    from rewards.scorer import SentimentScorer

    cwd = os.getcwd()
    os.chdir(REPO)  # the config's paths are relative to the repository root
    try:
        cfg = resolve_local_paths(parse_args(["--config", args.config, *shlex.split(args.extra_args)]))
    finally:
        os.chdir(cwd)
    queries, _ = held_out_queries(cfg, load_tokenizer(cfg.policy), args.eval_queries, args.eval_seed)
    scorer = SentimentScorer(dataclasses.replace(cfg.reward, torch_threads=args.threads))

    def score(policy: str) -> dict[str, float]:
        rewards = np.array(scorer.score(generate_responses(cfg, policy, queries, args.eval_seed, args.threads).texts))
        return {"mean": float(rewards.mean()), "positive": float((rewards > 0).mean())}

    initial = score(cfg.policy)
    for run in runs:
        run.held_out = score(run.policy)
        print(f"  held-out: {run.trainer} seed {run.seed}: mean reward {initial['mean']:+.3f} -> "
              f"{run.held_out['mean']:+.3f}, positive {initial['positive']:.0%} -> {run.held_out['positive']:.0%}",
              flush=True)
    return initial


def figure(runs: list[RunResult], path: Path, title: str) -> None:
    """Training reward (batch mean per step) against seconds of training: each seed thin, and per
    trainer the mean over seeds at each step, placed at the mean time that step ended."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (trainer, rs) in enumerate(by_trainer(runs).items()):
        colour = f"C{i}"
        curves = [(list(itertools.accumulate(r["time/step"] for r in run.rows)),
                   [r["env/reward_mean"] for r in run.rows]) for run in rs]
        for seconds, reward in curves:
            ax.plot(seconds, reward, color=colour, alpha=0.25, linewidth=0.8)
        n = min(len(c[0]) for c in curves)
        ax.plot([statistics.fmean(c[0][k] for c in curves) for k in range(n)],
                [statistics.fmean(c[1][k] for c in curves) for k in range(n)],
                color=colour, linewidth=2, label=f"{trainer} (mean of {len(rs)} seed{'s' if len(rs) > 1 else ''})")
    ax.set_xlabel("seconds of training (start-up not counted)")
    ax.set_ylabel("reward: mean of the step's batch")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_sd(xs: list[float], fmt: str = "{:.2f}") -> str:
    """'mean ± sd (min..max)' over seeds; just the value for one seed."""
    if len(xs) == 1:
        return fmt.format(xs[0])
    return (f"{fmt.format(statistics.fmean(xs))} ± {fmt.format(statistics.stdev(xs)).lstrip('+')} "
            f"({fmt.format(min(xs))}..{fmt.format(max(xs))})")


def by_trainer(runs: list[RunResult]) -> dict[str, list[RunResult]]:
    """Runs grouped by trainer, the project's first (in the order run), the reference last."""
    groups: dict[str, list[RunResult]] = {}
    for run in sorted(runs, key=lambda r: (r.trainer == "reference", r.seed)):
        groups.setdefault(run.trainer, []).append(run)
    return groups


Table = tuple[list[str], list[list[str]]]


def tables(runs: list[RunResult], initial: dict[str, float] | None) -> dict[str, Table]:
    """'speed', 'seeds' and (with held-out scores) 'held_out': (header, rows) each."""
    groups = by_trainer(runs)
    ref = groups["reference"]
    projects = [t for t in groups if t != "reference"]
    n_timed = len(ref[0].timed)
    warm = "without the first step" if n_timed < len(ref[0].rows) else "all steps"
    sps = {t: [r.samples_per_second for r in rs] for t, rs in groups.items()}
    ratios = {t: [p / q for p, q in zip(sps[t], sps["reference"])] for t in projects}
    speed_head = ["", *groups, *(f"{t} / reference" for t in projects)]
    speed = [[f"samples/s ({warm}, {n_timed} step{'s' if n_timed != 1 else ''} per run)",
              *(mean_sd(sps[t]) for t in groups), *(mean_sd(ratios[t]) for t in projects)]]
    names = {"step": "seconds per step", "generate": "  generate", "score": "  score", "update": "  update",
             "other": "  other (step − the three)"}
    for name, label in names.items():
        mean = {t: statistics.fmean(r.phase(name) for r in rs) for t, rs in groups.items()}
        q = mean["reference"]
        speed.append([label, *(f"{mean[t]:.3f}" for t in groups),
                      *(f"{mean[t] / q:.2f}" if q > 1e-9 else "–" for t in projects)])
    speed.append(["wall time per run, start-up included (s)",
                  *(f"{statistics.fmean(r.wall_seconds for r in rs):.1f}" for rs in groups.values()),
                  *("" for _ in projects)])

    seed_head = ["seed", "trainer", "samples/s", "/ reference", "training reward, last 5 steps"]
    if initial:
        seed_head += ["held-out reward after", "held-out positive after"]
    seeds = []
    for t, rs in groups.items():
        for r in rs:
            ratio = r.samples_per_second / next(q for q in ref if q.seed == r.seed).samples_per_second
            row = [str(r.seed), t, f"{r.samples_per_second:.2f}", f"{ratio:.2f}" if t != "reference" else "",
                   f"{r.reward_last5:+.3f}"]
            if initial:
                row += [f"{r.held_out['mean']:+.3f}", f"{r.held_out['positive']:.1%}"]
            seeds.append(row)
        if len(rs) > 1:
            row = ["mean ± sd", t, mean_sd(sps[t]), mean_sd(ratios[t]) if t != "reference" else "",
                   mean_sd([r.reward_last5 for r in rs], "{:+.3f}")]
            if initial:
                row += [mean_sd([r.held_out["mean"] for r in rs], "{:+.3f}"),
                        mean_sd([100 * r.held_out["positive"] for r in rs], "{:.1f}") + " %"]
            seeds.append(row)
    out = {"speed": (speed_head, speed), "seeds": (seed_head, seeds)}
    if initial:
        head = ["trainer", "mean reward before", "mean reward after", "gain", "positive before", "positive after"]
        rows = [[t, f"{initial['mean']:+.3f}", mean_sd([r.held_out["mean"] for r in rs], "{:+.3f}"),
                 mean_sd([r.held_out["mean"] - initial["mean"] for r in rs], "{:+.3f}"),
                 f"{100 * initial['positive']:.1f} %",
                 mean_sd([100 * r.held_out["positive"] for r in rs], "{:.1f}") + " %"] for t, rs in groups.items()]
        out["held_out"] = (head, rows)
    return out


def equal_learning(runs: list[RunResult], initial: dict[str, float]) -> str:
    """Whether each project variant's held-out gain agrees with the reference's (one line each).

    "Agree" means their spreads over seeds overlap: the difference of the mean gains is at most
    the sum of the two standard deviations. The line also gives the difference in standard
    errors of the difference (sqrt(sd1^2/n1 + sd2^2/n2)), the usual yardstick for so few seeds."""
    groups = by_trainer(runs)
    gains = {t: [r.held_out["mean"] - initial["mean"] for r in rs] for t, rs in groups.items()}
    sd = {t: statistics.stdev(g) if len(g) > 1 else 0.0 for t, g in gains.items()}
    ref = gains["reference"]
    lines = []
    for t in (t for t in groups if t != "reference"):
        diff = statistics.fmean(gains[t]) - statistics.fmean(ref)
        se = (sd[t] ** 2 / len(gains[t]) + sd["reference"] ** 2 / len(ref)) ** 0.5
        verdict = "agree" if abs(diff) <= sd[t] + sd["reference"] else "differ"
        lines.append(f"{t}: held-out gain {statistics.fmean(gains[t]):+.3f} ± {sd[t]:.3f} against the reference's "
                     f"{statistics.fmean(ref):+.3f} ± {sd['reference']:.3f} (difference {diff:+.3f}"
                     + (f", {abs(diff) / se:.1f} standard errors" if se > 0 else "") + f"): they {verdict}")
    return "\n".join(lines)


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(" --- " for _ in head) + "|"]
    out += ["| " + " | ".join(c.strip() for c in row) + " |" for row in rows]
    return "\n".join(out)


def markdown(args: argparse.Namespace, m: dict[str, Any], runs: list[RunResult], tabs: dict[str, Table],
             verdict: str, load: tuple[str, str], command: str) -> str:
    groups = by_trainer(runs)
    r0 = groups["reference"][0].info
    p0 = next(rs[0].info for t, rs in groups.items() if t != "reference")
    ppo = p0.get("ppo", {})
    cluster = p0.get("cluster", {})
    parts = [
        "## Speed against the reference trainer",
        "",
        f"Project (Ray actor/learner, `python -m learner.main`, `ppo.max_lag` {', '.join(map(str, args.lags))}) "
        f"against TRL {r0.get('trl')}'s legacy `PPOTrainer` "
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
        md_table(*tabs["speed"]),
        "",
        "Per-phase times are means per step over all runs (first step of each run left out). The project's "
        "generate and score are those of its slowest rollout actor (the actors generate their shards at the "
        "same time); its update is the learner's whole PPO step (no-grad passes and the epochs), as is the "
        "reference's (`PPOTrainer.step`). 'other' is the rest of the step: for the project the weight broadcast "
        "and Ray's calls, for the reference building the queries. With `ppo.max_lag=1` the next batch is "
        "generated during the update, so its phases overlap and 'other' is negative.",
        "",
        md_table(*tabs["seeds"]),
        "",
    ]
    if "held_out" in tabs:
        parts += [
            f"Held-out: {args.eval_queries} TEST-split openings (`learner.report`'s recipe, seed {args.eval_seed}), "
            "continued by the initial policy and by each run's tuned policy with the same sampling seed, scored by "
            "the same reward model in one process; 'positive' is the share of rewards above 0. Mean and sd over "
            "seeds.",
            "",
            md_table(*tabs["held_out"]),
            "",
            *(f"- {line}" for line in verdict.splitlines()),
            "",
        ]
    if args.figure:
        parts += [f"![reward against seconds of training]({args.figure.name})", ""]
    return "\n".join(parts)


def build_parser() -> argparse.ArgumentParser:
    """The command line: which runs, the reference's venv and threads, the held-out scoring, the outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/stand-in.yaml", help="settings file, relative to the repo root")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="PPO steps per run (default: the config's run.steps)")
    parser.add_argument("--lags", type=int, nargs="+", default=[0, 1], choices=(0, 1),
                        help="the project's ppo.max_lag values, one run each per seed (default: 0 1)")
    parser.add_argument("--threads", type=int, default=2,
                        help="the reference's torch threads, and the held-out scoring's (default 2)")
    parser.add_argument("--python", type=Path, default=DEFAULT_VENV / "bin" / "python",
                        help="the reference venv's python (setup_reference_env.sh)")
    parser.add_argument("--extra-args", default="",
                        help="settings passed to both trainers, e.g. '--ppo.batch_size 32 --ppo.mini_batch_size 32'")
    parser.add_argument("--project-args", default="", help="settings for the project only (e.g. '--cluster.num_rollout_workers 1')")
    parser.add_argument("--reference-args", default="", help="settings for the reference only")
    parser.add_argument("--eval-queries", type=int, default=256,
                        help="held-out TEST-split openings each tuned policy is scored on (0: none; default 256)")
    parser.add_argument("--eval-seed", type=int, default=1234, help="which held-out openings, and their sampling seed")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders and logs (default: a new temp dir)")
    parser.add_argument("--markdown", type=Path, default=None, help="write the results as markdown here")
    parser.add_argument("--figure", type=Path, default=None,
                        help="draw reward against seconds of training for every run here (PNG)")
    parser.add_argument("--json", type=Path, default=None, help="write every run's per-step rows here")
    return parser


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    """The parsed command line, checked before any run starts; ``--steps`` defaults to the config's run.steps."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is None:
        cfg_path = Path(args.config) if Path(args.config).is_absolute() else REPO / args.config
        args.steps = int(((yaml.safe_load(cfg_path.read_text()) or {}).get("run") or {}).get("steps") or 0)
        if args.steps <= 0:
            parser.error(f"{args.config} sets no run.steps: give --steps")
    if not args.python.exists():
        parser.error(f"no reference python at {args.python}: run bash benchmarks/setup_reference_env.sh")
    if args.eval_queries < 0:
        parser.error("--eval-queries must be >= 0")
    return args


def announce(args: argparse.Namespace, m: dict[str, Any], load_before: str, lags: list[int], work: Path) -> None:
    """Prints the machine and the plan, with a warning when other work already loads the cores
    (the timings would show it)."""
    print(f"machine: {m['cores']} cores, {m['cpu']}; torch {m['torch']}; load average {load_before}", flush=True)
    if float(load_before.split()[0]) > 0.5 * (m["cores"] or 1):
        print(f"warning: load average {load_before.split()[0]} on {m['cores']} cores before starting: other work "
              "shares the cores and the timings will show it", flush=True)
    print(f"{len(args.seeds)} seeds x {len(lags) + 1} runs (project max_lag {', '.join(map(str, lags))}; reference), "
          f"{args.steps} steps each; logs and runs in {work}", flush=True)


def run_all(args: argparse.Namespace, work: Path, lags: list[int]) -> list[RunResult]:
    """Every seed's runs, one after the other (never two at once: they would share the cores), the
    order alternating from seed to seed."""
    runs: list[RunResult] = []
    t0 = time.perf_counter()
    jobs = [lambda seed, lag=lag: run_project(args, seed, work, lag) for lag in lags]
    jobs.insert(1, lambda seed: run_reference(args, seed, work))  # project, reference, project max_lag=1
    for i, seed in enumerate(args.seeds):
        for job in (jobs if i % 2 == 0 else jobs[::-1]):  # alternate, so a drift in load favours no trainer
            result = job(seed)
            runs.append(result)
            print(f"  -> {result.trainer} seed {seed}: {result.samples_per_second:.2f} samples/s, reward last 5 "
                  f"steps {result.reward_last5:+.3f}, {result.wall_seconds:.0f}s in all "
                  f"({time.perf_counter() - t0:.0f}s elapsed)", flush=True)
    return runs


def print_results(tabs: dict[str, Table], verdict: str, load: tuple[str, str], work: Path) -> None:
    """The tables and the verdict as text, then the load before and after and where the runs are."""
    for head, rows in tabs.values():
        print()
        print(text_table(head, rows))
    if verdict:
        print("\n" + verdict)
    print(f"\nload average before / after: {load[0]} / {load[1]}; runs and logs in {work}")


def write_outputs(args: argparse.Namespace, m: dict[str, Any], runs: list[RunResult], tabs: dict[str, Table],
                  verdict: str, initial: dict[str, float] | None, load: tuple[str, str], command: str) -> None:
    """The files asked for: ``--figure``, ``--markdown``, ``--json``."""
    if args.figure:
        figure(runs, args.figure, f"{args.config}, {args.steps} steps, seeds {', '.join(map(str, args.seeds))}, "
                                  f"{m['cores']} cores ({m['cpu']})")
        print(f"figure written to {args.figure}")
    if args.markdown:
        args.markdown.write_text(markdown(args, m, runs, tabs, verdict, load, command))
        print(f"markdown written to {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "args": {k: str(v) for k, v in vars(args).items()},
                                         "held_out_initial": initial, "runs": [vars(r) for r in runs]},
                                        indent=1, default=str))
        print(f"json written to {args.json}")


def main(argv: list[str] | None = None) -> int:
    """Runs both trainers for every seed, scores the tuned policies, prints the results, writes the files."""
    args = parse_cli(argv)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="ppo-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "benchmarks/compare.py", *(argv if argv is not None else sys.argv[1:])])
    m = machine()
    load_before = loadavg()
    lags = list(dict.fromkeys(args.lags))
    announce(args, m, load_before, lags, work)

    runs = run_all(args, work, lags)
    load_after = loadavg()
    initial = score_held_out(args, runs) if args.eval_queries else None

    tabs = tables(runs, initial)
    verdict = equal_learning(runs, initial) if initial and len(args.seeds) > 1 else ""
    print_results(tabs, verdict, (load_before, load_after), work)
    write_outputs(args, m, runs, tabs, verdict, initial, (load_before, load_after), command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
