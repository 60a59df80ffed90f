"""The driver: ``python -m learner.main``.

    # the stand-ins in ../shared, on this machine (Ray starts embedded):
    python -m learner.main --config configs/stand-in.yaml
    # continue a run that stopped (crash, preemption, Ctrl-C):
    python -m learner.main --resume runs/20261126-124951
    # the recipe itself (hub models and data), on a running cluster:
    ray job submit --working-dir . -- python -m learner.main --steps 194

A light process that may sit on a CPU-only head node: the PPO learner lives in its own
actor, and the driver only moves token ids, statistics and files. Each step:

1. broadcast: the learner's weights go into the object store once; every rollout actor
   loads that one copy and reports the version it now holds;
2. rollout: the batch's queries are split into fixed contiguous shards, one per rollout
   actor; each generates its shard and sends the texts straight to a reward actor, which
   merges concurrent requests into batched forward passes. A shard whose actor (or reward
   actor) died is redone once Ray has restarted it, with the current weights;
3. update: the learner runs the reference PPO step on the whole batch;
4. log: one line, one JSON line of statistics, the dashboard metrics; a checkpoint every
   ``run.checkpoint_every`` steps.
At the end: a last checkpoint and the tuned policy in the run directory.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from learner import checkpoint
from learner.config import Config, ConfigError, parse_args, resolve_local_paths
from learner.rundir import RunDir
from learner.data import DataState, PromptStream, load_texts
from learner.models import ModelLoadError, load_pretrained, load_tokenizer

log = logging.getLogger("learner.main")


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


def shard_bounds(batch_size: int, n: int) -> list[tuple[int, int]]:
    """Fixed contiguous shards: query i always goes to the same actor, whoever is free first,
    so a resumed run samples exactly what the uninterrupted one did."""
    edges = np.linspace(0, batch_size, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def check_models(cfg: Config) -> None:
    """Cheap checks on the models' configs before any actor starts."""
    from transformers import AutoConfig

    policy = load_pretrained(AutoConfig, cfg.policy, "rollout.policy")
    context = getattr(policy, "n_positions", None) or getattr(policy, "max_position_embeddings", None)
    longest = cfg.data.query_max_tokens + cfg.rollout.response_max_tokens
    if context and longest > context:
        raise ConfigError(f"data.query_max_tokens ({cfg.data.query_max_tokens}) + rollout.response_max_tokens "
                          f"({cfg.rollout.response_max_tokens}) exceed the policy's context of {context} positions")
    reward = load_pretrained(AutoConfig, cfg.reward.model, "reward.model")
    labels = list((reward.label2id or {}).keys())
    if cfg.reward.positive_label not in labels:
        raise ConfigError(f"reward.positive_label: the reward model has no label '{cfg.reward.positive_label}' "
                          f"(labels: {', '.join(labels) or 'none'}); set reward.positive_label")


class Driver:
    """The training loop over the actors; every remote wait is bounded."""

    def __init__(self, cfg: Config, run: RunDir, stream: PromptStream, tokenizer) -> None:
        import ray

        from learner import placement
        from learner.metrics import RunMetrics

        self.ray, self.cfg, self.run, self.stream, self.tokenizer = ray, cfg, run, stream, tokenizer
        self.roles = placement.resolve_roles(cfg)
        self.pg = placement.reserve(cfg, self.roles)
        self.actors = placement.spawn(cfg, self.roles, self.pg)
        names = ["learner"] + [f"rollout-{i}" for i in range(len(self.actors.rollouts))] + \
            [f"rewards-{i}" for i in range(len(self.actors.rewards))]
        pings = self.wait([a.ping.remote() for a in [self.actors.learner, *self.actors.rollouts, *self.actors.rewards]],
                          "actor start-up")
        # Where each actor runs (pid, node, device): for users, and for the failure tests.
        (run.path / "actors.json").write_text(json.dumps(dict(zip(names, pings)), indent=1))
        self.shards = shard_bounds(cfg.ppo.batch_size, len(self.actors.rollouts))
        self.metrics = RunMetrics(run.path.name)
        self.collective = cfg.cluster.weight_broadcast == "collective"
        if self.collective:
            self._join_group()
        self.failures = 0
        self.prefetched: tuple[list[list[int]], list[Any]] | None = None  # ppo.max_lag=1: the next batch
        self.data_state = DataState(**vars(stream.state))

    # ---------------------------------------------------------------- remote calls

    def wait(self, refs, what: str):
        """ray.get with a timeout and a one-line message naming what did not answer."""
        ray = self.ray
        try:
            return ray.get(refs, timeout=self.cfg.cluster.call_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RunError(f"{what} did not finish within cluster.call_timeout_s="
                           f"{self.cfg.cluster.call_timeout_s:g}s") from None

    def _failed(self, what: str, err: BaseException) -> None:
        self.failures += 1
        if self.failures > self.cfg.cluster.max_failures:
            raise RunError(f"{what} failed ({_root_cause(err)}); {self.failures} actor failures exceed "
                           f"cluster.max_failures={self.cfg.cluster.max_failures}")
        log.warning("%s failed (%s); redoing its work once Ray has restarted it (%d/%d failures)",
                    what, _root_cause(err), self.failures, self.cfg.cluster.max_failures)
        print(f"warning: {what} failed ({_root_cause(err)}); redoing its work", file=sys.stderr, flush=True)

    def _until_alive(self, actor, what: str) -> None:
        """Wait (bounded) until a restarted actor answers again."""
        deadline = time.monotonic() + self.cfg.cluster.call_timeout_s
        while True:
            try:
                self.ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.ActorUnavailableError):
                if time.monotonic() > deadline:
                    raise RunError(f"{what} did not come back within cluster.call_timeout_s") from None
                time.sleep(0.5)
            except self.ray.exceptions.GetTimeoutError:
                raise RunError(f"{what} did not come back within cluster.call_timeout_s") from None

    # ---------------------------------------------------------------- one step

    def broadcast(self) -> tuple[int, Any]:
        """The learner's weights to every rollout actor: into the object store once, every
        actor loading that copy, or (cluster.weight_broadcast=collective) one torch.distributed
        broadcast. Returns (version, the object-store copy or None)."""
        if self.collective:
            return self._collective_broadcast(), None
        version_ref, weights = self.actors.learner.weights.options(num_returns=2).remote()
        version = self.wait(version_ref, "learner weights")
        self._gather({i: (lambda w=w: w.load_weights.remote(weights, version))
                      for i, w in enumerate(self.actors.rollouts)}, "weight broadcast", version, weights)
        return version, weights

    def rollout(self, queries: list[list[int]], step: int, version: int, weights) -> list[Any]:
        """Every shard's Rollout, in shard order."""
        timeout = self.cfg.cluster.call_timeout_s
        calls = {i: (lambda i=i, a=a, b=b: self.actors.rollouts[i].rollout.remote(queries[a:b], step, i, timeout))
                 for i, (a, b) in enumerate(self.shards)}
        return self._gather(calls, "rollout", version, weights)

    def _gather(self, calls: dict[int, Any], what: str, version: int, weights) -> list[Any]:
        """Run one call per rollout actor; a call whose actor (or, under it, a reward actor)
        died is made again once Ray has restarted it and it holds the current weights."""
        ray = self.ray
        lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        pending = {make(): i for i, make in calls.items()}
        results: dict[int, Any] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=self.cfg.cluster.call_timeout_s)
            if not done:
                raise RunError(f"{what} did not finish within cluster.call_timeout_s={self.cfg.cluster.call_timeout_s:g}s")
            i = pending.pop(done[0])
            try:
                results[i] = ray.get(done[0])
                continue
            except lost as err:
                failure = err
            except ray.exceptions.RayTaskError as err:
                if not isinstance(err.cause, lost):  # a real error, not a lost actor
                    raise RunError(f"{what} on rollout-{i} failed: {_root_cause(err)}") from None
                failure = err
            self._recover(i, failure, version, weights)
            pending[calls[i]()] = i
        return [results[i] for i in sorted(results)]

    # -- the collective path

    def _join_group(self) -> None:
        """Every member (re)joins one weight group on a fresh port of the learner's node."""
        c = self.cfg.cluster
        backend = "nccl" if self.roles.learner_gpus >= 1 and self.roles.rollout_gpus >= 1 else "gloo"
        timeout = min(c.call_timeout_s, 120.0)
        members = [self.actors.learner, *self.actors.rollouts]
        self.wait([m.leave_weight_group.remote() for m in members], "leaving the weight group")
        addr = self.wait(self.actors.learner.weight_group_address.remote(), "weight group address")
        world = len(members)
        self.wait([self.actors.learner.join_weight_group.remote(addr, world, backend, timeout)]
                  + [w.join_weight_group.remote(addr, i + 1, world, backend, timeout)
                     for i, w in enumerate(self.actors.rollouts)], f"joining the {backend} weight group")

    def _collective_broadcast(self) -> int:
        """One broadcast; a lost rollout actor is waited for, the group rebuilt, and it is sent again."""
        ray = self.ray
        while True:
            refs = [self.actors.learner.send_weights.remote()] + [w.receive_weights.remote()
                                                                  for w in self.actors.rollouts]
            try:
                versions = self.wait(refs, "weight broadcast")
                return versions[0]
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.RayTaskError) as err:
                self._failed("the collective weight broadcast", err)
            for i, worker in enumerate(self.actors.rollouts):
                self._until_alive(worker, f"rollout-{i}")
            self._join_group()

    def _recover(self, i: int, err: BaseException, version: int, weights) -> None:
        task_error = isinstance(err, self.ray.exceptions.RayTaskError)
        self._failed(f"a reward actor (called by rollout-{i})" if task_error else f"rollout-{i}", err)
        worker = self.actors.rollouts[i]
        self._until_alive(worker, f"rollout-{i}")
        for j, reward in enumerate(self.actors.rewards):
            self._until_alive(reward, f"rewards-{j}")
        # A restarted actor holds the weights it loaded from disk: give it the current ones.
        if self.collective:  # it left the weight group when it died: rebuild the group
            self._join_group()
            self._collective_broadcast()
        else:
            self.wait(worker.load_weights.remote(weights, version), f"weights for restarted rollout-{i}")

    def train_step(self, step: int, steps: int) -> dict[str, Any]:
        """One PPO step. With ppo.max_lag=1 the next step's batch is generated (by these same
        weights) while the learner updates, and waits in ``self.prefetched``."""
        cfg, lag = self.cfg, self.cfg.ppo.max_lag
        t0 = time.perf_counter()
        version, weights = self.broadcast()
        t1 = time.perf_counter()
        if self.prefetched is not None:
            queries, rollouts = self.prefetched
            self.prefetched = None
        else:
            queries = self.stream.next_batch()
            rollouts = self.rollout(queries, step, version, weights)
        consumed = DataState(**vars(self.stream.state))  # the data position once this step is done
        t2 = time.perf_counter()
        responses = [r for ro in rollouts for r in ro.responses]
        scores = [s for ro in rollouts for s in ro.scores]
        if step == cfg.run.test_nan_reward_step:
            scores[0] = float("nan")
        if not np.all(np.isfinite(scores)):
            raise NonFiniteStop(f"non-finite reward at step {step + 1}", intact=True)
        behaviour = [lp for ro in rollouts for lp in ro.logprobs] if lag else None
        step_ref = self.actors.learner.step.remote(queries, responses, scores, behaviour)
        if lag and step + 1 < steps:  # overlap: generate the next batch during the update
            next_queries = self.stream.next_batch()
            self.prefetched = (next_queries, self.rollout(next_queries, step + 1, version, weights))
        stats = self._learner_result(step_ref, step)
        self.data_state = consumed
        t3 = time.perf_counter()
        tokens = sum(len(q) + len(r) for q, r in zip(queries, responses))
        oldest = min(r.weight_version for r in rollouts)
        stats.update({
            "step": step, "time/broadcast": t1 - t0, "time/rollout": t2 - t1, "time/update": t3 - t2,
            "time/step": t3 - t0, "time/generate": max(r.generate_seconds for r in rollouts),
            "time/score": max(r.score_seconds for r in rollouts),
            "rollout/weight_version": oldest, "rollout/version_lag": version - oldest,
            "samples_per_second": cfg.ppo.batch_size / (t3 - t0), "tokens_per_second": tokens / (t3 - t0),
            "failures": self.failures,
        })
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        self.run.log_step(stats, {"step": step, "scores": scores, "queries": [decode(q) for q in queries],
                                  "responses": [decode(r) for r in responses]})
        self.metrics.record(stats, {f"rollout-{i}": version - r.weight_version for i, r in enumerate(rollouts)})
        return stats

    def _learner_result(self, step_ref, step: int) -> dict[str, Any]:
        try:
            return self.wait(step_ref, "PPO step")
        except self.ray.exceptions.RayTaskError as err:
            if isinstance(err.cause, FloatingPointError):
                raise NonFiniteStop(f"{err.cause} at step {step + 1}", intact=getattr(err.cause, "intact", False))
            raise RunError(f"PPO step failed: {_root_cause(err)}") from None
        except self.ray.exceptions.RayActorError as err:
            raise RunError(f"the learner actor died ({_root_cause(err)}); continue from the last checkpoint with "
                           f"--resume {self.run.path}") from None

    # ---------------------------------------------------------------- state

    def save_checkpoint(self, steps_done: int) -> Path:
        state = self.wait(self.actors.learner.state_bytes.remote(), "learner state")
        # The data position of the finished steps: a prefetched batch (ppo.max_lag=1) is drawn
        # again on resume, and generated by the resumed weights.
        driver = {"step": steps_done, "data": vars(self.data_state), "seed": self.cfg.run.seed}
        files = {"learner.pt": state, "driver.json": json.dumps(driver).encode()}
        for name in ("stats.jsonl", "rollouts.jsonl"):
            file = self.run.path / name
            files[name] = file.read_bytes() if file.exists() else b""
        return checkpoint.write(self.run.path, steps_done, files, self.cfg.run.keep_checkpoints)

    def restore(self, ckpt: Path) -> int:
        driver = json.loads((ckpt / "driver.json").read_text())
        self.stream.load_state(DataState(**driver["data"]))
        self.data_state = DataState(**driver["data"])
        self.wait(self.actors.learner.load_state_bytes.remote((ckpt / "learner.pt").read_bytes()), "restoring the learner")
        self.run.restore_logs(ckpt)
        return driver["step"]

    def save_policy(self) -> Path:
        files = self.wait(self.actors.learner.export_policy.remote(), "exporting the policy")
        folder = self.run.path / "policy"
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder


class NonFiniteStop(RunError):
    def __init__(self, message: str, intact: bool) -> None:
        super().__init__(message)
        self.intact = intact


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def train(cfg: Config) -> Path:
    """1. data and checks  2. Ray and actors  3. resume  4. the steps  5. checkpoint + policy
    6. report."""
    import ray

    from learner import placement

    # 1. everything that can fail fast fails before Ray starts
    resume_from = None
    if cfg.run.resume:
        _, resume_from, notes = checkpoint.find_resumable(Path(cfg.run.resume))
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    check_models(cfg)
    tokenizer = load_tokenizer(cfg.policy)
    stream = PromptStream(load_texts(cfg.data.dataset, cfg.data.split, cfg.data.text_column), tokenizer,
                          cfg.data, cfg.ppo.batch_size, cfg.run.seed)
    steps = cfg.run.steps or stream.steps_per_epoch
    run = RunDir(cfg)

    # 2. Ray, resources, actors
    info = placement.connect(cfg, namespace=f"ppo-{run.path.name}")
    print(f"Ray dashboard: {info['dashboard_url'] or 'not running'}  |  run directory: {run.path}", flush=True)
    try:
        driver = Driver(cfg, run, stream, tokenizer)
        # 3. resume
        start = 0
        if resume_from is not None:
            start = driver.restore(resume_from)
            print(f"resumed from {resume_from} at step {start + 1}", flush=True)
        # 4. the steps
        t_start, last_ckpt = time.perf_counter(), start
        for step in range(start, steps):
            try:
                stats = driver.train_step(step, steps)
            except NonFiniteStop as err:
                where = (f"saved the last good state as {driver.save_checkpoint(step)}" if err.intact
                         else f"the last good checkpoint is step {last_ckpt}")
                raise RunError(f"{err}; {where}") from None
            done = step + 1 - start
            eta = (time.perf_counter() - t_start) / done * (steps - step - 1)
            print(f"step {step + 1}/{steps}  reward {stats['env/reward_mean']:+.3f}  "
                  f"kl {stats['objective/kl']:.3f}  beta {stats['objective/kl_coef']:.3f}  "
                  f"gen {stats['time/generate']:.1f}s  score {stats['time/score']:.2f}s  "
                  f"update {stats['time/update']:.1f}s  {stats['samples_per_second']:.1f} samples/s  "
                  f"eta {_fmt_eta(eta)}", flush=True)
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                driver.save_checkpoint(step + 1)
                last_ckpt = step + 1
        # 5. the end
        if last_ckpt != steps:
            driver.save_checkpoint(steps)
        print(f"tuned policy saved to {driver.save_policy()}", flush=True)
    finally:
        ray.shutdown()
    # 6. the figure and the before/after table (python -m learner.report RUN_DIR redoes them)
    if cfg.run.report_queries:
        from learner.report import make_report

        report = make_report(run.path, n_queries=cfg.run.report_queries, seed=cfg.run.seed)
        print(f"reward figure: {report['figure']}  |  before/after table: {report['markdown']}  "
              f"(mean reward {report['mean_before']:+.3f} -> {report['mean_after']:+.3f})", flush=True)
    return run.path


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
    from learner.placement import PlacementError

    try:
        cfg, _ = parse_args(argv)
        resolve_local_paths(cfg)
        train(cfg)
    except (ConfigError, ModelLoadError, checkpoint.CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunError, PlacementError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a remote failure nobody anticipated: one line, not Ray's traceback wall
        import ray

        if not isinstance(err, ray.exceptions.RayError):
            raise
        print(f"error: {_root_cause(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: continue with --resume RUN_DIR from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
