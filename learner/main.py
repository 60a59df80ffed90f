"""The driver: ``python -m learner.main``.

    # the stand-ins in ../shared, on this machine (Ray starts embedded):
    python -m learner.main --config configs/stand-in.yaml
    # the recipe itself (hub models and data), on a running cluster:
    ray job submit --working-dir . -- python -m learner.main --steps 194

A light process that may sit on a CPU-only head node: the PPO learner lives in its own
actor, and the driver only moves token ids and statistics. Each step:

1. broadcast: the learner's weights go into the object store once; every rollout actor
   loads that one copy and reports the version it now holds;
2. rollout: the batch's queries are split into fixed contiguous shards, one per rollout
   actor; each generates its shard and sends the texts straight to a reward actor, which
   merges concurrent requests into batched forward passes;
3. update: the learner runs the reference PPO step on the whole batch;
4. log one line and the step's statistics.
At the end the tuned policy is saved in the run directory.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from learner.config import Config, ConfigError, parse_args, resolve_local_paths
from learner.models import ModelLoadError, load_tokenizer
from learner.data import PromptStream, load_texts

log = logging.getLogger("learner.main")


def shard_bounds(batch_size: int, n: int) -> list[tuple[int, int]]:
    """Fixed contiguous shards: query i always goes to the same actor, whoever is free first."""
    edges = np.linspace(0, batch_size, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


class Run:
    """A run directory: the resolved config, one JSON line of statistics per step, the policy."""

    def __init__(self, cfg: Config) -> None:
        name = cfg.run.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.dir = Path(cfg.run.out_dir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.stats_file = self.dir / "stats.jsonl"

    def log_step(self, stats: dict[str, Any]) -> None:
        with self.stats_file.open("a") as f:
            f.write(json.dumps(stats) + "\n")


def train(cfg: Config) -> Path:
    import ray

    from learner import placement

    run = Run(cfg)
    tokenizer = load_tokenizer(cfg.policy)
    stream = PromptStream(load_texts(cfg.data.dataset, cfg.data.split, cfg.data.text_column), tokenizer,
                          cfg.data, cfg.ppo.batch_size, cfg.run.seed)
    steps = cfg.run.steps or stream.steps_per_epoch

    info = placement.connect(cfg, namespace=f"ppo-{run.dir.name}")
    print(f"Ray dashboard: {info['dashboard_url'] or 'not running'}  |  run directory: {run.dir}", flush=True)
    try:
        roles = placement.resolve_roles(cfg)
        pg = placement.reserve(cfg, roles)
        actors = placement.spawn(cfg, roles, pg)
        wait = _waiter(cfg.cluster.call_timeout_s)
        wait([a.ping.remote() for a in [actors.learner, *actors.rollouts, *actors.rewards]], "actor start-up")
        shards = shard_bounds(cfg.ppo.batch_size, len(actors.rollouts))
        for step in range(steps):
            t0 = time.perf_counter()
            # 1. broadcast: one copy in the object store, loaded by every rollout actor
            version_ref, weights = actors.learner.weights.options(num_returns=2).remote()
            version = wait(version_ref, "learner weights")
            got = wait([w.load_weights.remote(weights, version) for w in actors.rollouts], "weight broadcast")
            t1 = time.perf_counter()
            # 2. rollout + reward, each actor on its fixed shard
            queries = stream.next_batch()
            rollouts = wait([w.rollout.remote(queries[a:b], step, i, cfg.cluster.call_timeout_s)
                             for i, (w, (a, b)) in enumerate(zip(actors.rollouts, shards))], "rollout")
            t2 = time.perf_counter()
            # 3. the PPO step on the whole batch
            responses = [r for ro in rollouts for r in ro.responses]
            scores = [s for ro in rollouts for s in ro.scores]
            stats = wait(actors.learner.step.remote(queries, responses, scores), "PPO step")
            t3 = time.perf_counter()
            # 4. log
            stats.update({
                "step": step, "time/broadcast": t1 - t0, "time/rollout": t2 - t1, "time/update": t3 - t2,
                "time/step": t3 - t0, "time/generate": max(r.generate_seconds for r in rollouts),
                "time/score": max(r.score_seconds for r in rollouts),
                "rollout/weight_version": min(r.weight_version for r in rollouts),
                "rollout/version_lag": version - min(got),
                "samples_per_second": cfg.ppo.batch_size / (t3 - t0),
            })
            run.log_step(stats)
            print(f"step {step + 1}/{steps}  reward {stats['env/reward_mean']:+.3f}  "
                  f"kl {stats['objective/kl']:.3f}  beta {stats['objective/kl_coef']:.3f}  "
                  f"gen {stats['time/generate']:.1f}s  score {stats['time/score']:.2f}s  "
                  f"update {stats['time/update']:.1f}s  {stats['samples_per_second']:.1f} samples/s", flush=True)
        path = wait(actors.learner.save.remote(str(run.dir / "policy")), "saving the policy")
        print(f"tuned policy saved to {path}", flush=True)
    finally:
        ray.shutdown()
    return run.dir


def _waiter(timeout_s: float):
    """ray.get with a timeout and a message naming what did not answer: never a silent hang."""
    import ray

    from learner.placement import RunError

    def wait(refs, what: str):
        try:
            return ray.get(refs, timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"{what} did not finish within cluster.call_timeout_s={timeout_s:g}s") from None
        except ray.exceptions.RayError as err:
            raise RunError(f"{what} failed: {_root_cause(err)}") from None

    return wait


def _root_cause(err: BaseException) -> str:
    """The innermost error's one line, not Ray's wall of remote tracebacks."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, BaseException) and cause is not err:
        return _root_cause(cause)
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    errors = [ln for ln in lines if "Error: " in ln and not ln.startswith(("File ", "raise "))]
    return (errors[-1] if errors else (lines[-1] if lines else type(err).__name__))[:500]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from learner.placement import RunError

    try:
        cfg, _ = parse_args(argv)
        resolve_local_paths(cfg)
        train(cfg)
    except (ConfigError, ModelLoadError, RunError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
