"""The driver behind ``python -m learner.main`` (learner/main.py is the command line).

A light process that may sit on a CPU-only head node: the PPO learner lives in its own
actor, and the driver only moves token ids, statistics and files. Each step:

1. broadcast: the learner's weights go into the object store once; every rollout actor
   loads that one copy and reports the version it now holds;
2. rollout: the batch's queries are split into fixed contiguous shards, one per rollout
   actor; each generates its shard and sends the texts straight to a reward actor, which
   merges concurrent requests into batched forward passes. A shard whose actor (or reward
   actor) died is redone once Ray has restarted it, with the current weights. Every shard
   reports a fingerprint of the weights that generated it, checked against the learner's;
3. update: the learner runs the reference PPO step on the whole batch (with ppo.max_lag=1
   the next batch is generated meanwhile, by the same weights);
4. log: one line, one JSON line of statistics, the dashboard metrics; a checkpoint every
   ``run.checkpoint_every`` steps.
At the end: a last checkpoint and the tuned policy in the run directory. A learner that dies
is replaced in its bundle and continues from the newest good checkpoint, redoing the steps
since (learner/orchestration/recovery.py); deaths beyond cluster.max_failures stop the run.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from actors.rollout import Rollout
from learner.records import checkpoint
from learner.orchestration.weights import Broadcast, Sent, verify
from learner.config import FROZEN_ON_RESUME, Config, ConfigError, get_path
from learner.orchestration.data import DataState, PromptStream, held_out_prompts, load_texts
from learner.core.models import load_pretrained, load_tokenizer
from modelhost.loading import check_weights
from learner.orchestration.recovery import LearnerLost, RayCalls, Recovery, RunError
from learner.records.rundir import RunDir
from learner.core.learner import NonFiniteError
from rewards.sources import RewardFunction, RewardSourceError, load_function

log = logging.getLogger("learner.orchestration.driver")

Batch = tuple[list[list[int]], list[Rollout]]  # a step's queries and its shards' rollouts
# The step number the held-out prompts are sampled under: rollout actors seed their draws from
# (run.seed, step, shard), so every evaluation draws alike and only the weights differ.
EVAL_STEP = 2**31 - 1


def shard_bounds(batch_size: int, n: int) -> list[tuple[int, int]]:
    """Fixed contiguous shards: query i always goes to the same actor, whoever is free first,
    so a resumed run samples exactly what the uninterrupted one did."""
    edges = np.linspace(0, batch_size, n + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in itertools.pairwise(edges)]


def check_models(cfg: Config) -> None:
    """Cheap checks on the models' configs before any actor starts."""
    from transformers import AutoConfig

    policy = load_pretrained(AutoConfig, cfg.policy, "rollout.policy")
    heads = [a for a in policy.architectures or [] if not a.endswith(("LMHeadModel", "ForCausalLM"))]
    if heads and len(heads) == len(policy.architectures):
        raise ConfigError(f"rollout.policy: '{cfg.policy}' is a {heads[0]}, not a causal language model; pass a "
                          "policy such as a GPT-2 save_pretrained folder")
    check_weights(cfg.policy, "rollout.policy")


def check_rewards(cfg: Config, functions: dict[str, RewardFunction] | None = None) -> None:
    """Every reward source before any actor starts: a classifier's weights, config and label, a
    Python function imported (the working directory searched too) and callable as
    NAME(prompts, responses)."""
    from transformers import AutoConfig

    for spec in cfg.reward.source_specs():
        where = f"reward.sources '{spec.name}'" if cfg.reward.sources else f"reward.{spec.kind}"
        if spec.model:
            label = spec.positive_label or cfg.reward.positive_label
            what = f"{where}: model" if cfg.reward.sources else "reward.model"
            check_weights(spec.model, what)
            reward = load_pretrained(AutoConfig, spec.model, what)
            labels = list((reward.label2id or {}).keys())
            if label not in labels:
                where = where if cfg.reward.sources else "reward.positive_label"
                raise ConfigError(f"{where}: the reward model has no label '{label}' (labels: "
                                  f"{', '.join(labels) or 'none'}); set reward.positive_label")
        elif spec.function:
            try:
                load_function(spec.function, functions)
            except ValueError as err:
                raise ConfigError(f"{where}: {err}") from None


class RewardFailed(RunError):
    """A reward source failed or answered wrongly in the rollout of ``step`` (0-based); the
    message names the source and the step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def reward_failure(err: BaseException | None) -> str | None:
    """The one line of a RewardSourceError under a failed rollout call (Ray wraps it once per
    actor it crossed: the reward actor's, then the rollout actor's), or None."""
    while err is not None:
        cause = getattr(err, "cause", None)
        if not isinstance(cause, BaseException):
            break
        err = cause
    return str(err).splitlines()[0] if isinstance(err, RewardSourceError) and str(err) else None


def source_means(rollouts: list[Rollout], prefix: str = "env/reward/") -> dict[str, float]:
    """<prefix><name>: each reward source's mean over the whole batch (every shard)."""
    out = {}
    for name in rollouts[0].source_scores:
        values = [v for r in rollouts for v in r.source_scores[name]]
        out[f"{prefix}{name}"] = sum(values) / len(values)
    return out


def check_context(cfg: Config, longest_query: int) -> None:
    """The longest prompt and response fit the policy's context; ``longest_query``: the most
    tokens a prompt can have (data.query_max_tokens, plus a chat template's or BOS in opening mode)."""
    from transformers import AutoConfig

    policy = load_pretrained(AutoConfig, cfg.policy, "rollout.policy")
    context = getattr(policy, "n_positions", None) or getattr(policy, "max_position_embeddings", None)
    longest = longest_query + cfg.rollout.response_max_tokens
    if context and longest > context:
        extra = f", with {longest_query - cfg.data.query_max_tokens} tokens of the chat template or BOS," \
            if longest_query > cfg.data.query_max_tokens else ""
        raise ConfigError(f"data.query_max_tokens ({cfg.data.query_max_tokens}){extra} + rollout.response_max_tokens "
                          f"({cfg.rollout.response_max_tokens}) exceed the policy's context of {context} positions")


class Driver:
    """The training loop over the actors. Each step: broadcast, rollout, update, log."""

    def __init__(self, cfg: Config, run: RunDir, stream: PromptStream, tokenizer,
                 eval_queries: list[list[int]] | None = None,
                 functions: dict[str, RewardFunction] | None = None) -> None:
        from learner.orchestration import placement
        from learner.records.metrics import RunMetrics

        self.cfg, self.run, self.stream, self.tokenizer = cfg, run, stream, tokenizer
        self.eval_queries = eval_queries  # run.eval_every: the fixed held-out prompts
        roles = placement.resolve_roles(cfg)
        pg = placement.reserve(cfg, roles)
        self.fleet = placement.spawn(cfg, roles, pg, functions)
        self.recovery = Recovery(self.fleet, RayCalls(), cfg.cluster.call_timeout_s, cfg.cluster.max_failures,
                                 start_learner=lambda: placement.spawn_learner(
                                     cfg, roles, pg, name=f"learner-{self.recovery.deaths}"))
        self.recovery.start()
        self.plan = placement.describe(cfg, roles, self.recovery.pings)
        self._record_actors()
        self.weights = Broadcast(self.fleet, self.recovery)
        self.metrics = RunMetrics(run.path.name)
        self.prefetched: Batch | None = None  # ppo.max_lag=1: the next step's batch, generated during the update
        self.first = self.step_start = self._position()

    def train_step(self, step: int, steps: int) -> dict[str, Any]:
        """One PPO step: 1. broadcast  2. rollout  3. update  4. log."""
        self.step_start = self._position()
        t0 = time.perf_counter()
        sent = self.weights.send()
        t1 = time.perf_counter()
        evaluation = self.evaluate(sent, step) if self.eval_queries and step % self.cfg.run.eval_every == 0 else {}
        # The step's own clock leaves the evaluation out, so its times and throughput compare across steps.
        t0, t1 = t0 + evaluation.get("time/eval", 0.0), t1 + evaluation.get("time/eval", 0.0)
        queries, rollouts = self.prefetched or self.rollout(self.stream.next_batch(), step, sent)
        self.prefetched = None
        t2 = time.perf_counter()
        responses = [r for ro in rollouts for r in ro.responses]
        scores = [s for ro in rollouts for s in ro.scores]
        behaviour = [lp for ro in rollouts for lp in ro.logprobs] if self.cfg.ppo.max_lag else None
        update = [rank.step.remote(queries, responses, scores, behaviour) for rank in self.fleet.learner_ranks]
        if self.cfg.ppo.max_lag and step + 1 < steps:  # the next batch, by these weights, during the update
            self.prefetched = self.rollout(self.stream.next_batch(), step + 1, sent)
        stats = self.recovery.learner_all(update, "PPO step")
        stats.update(step_stats(step, rollouts, sent, (t0, t1, t2, time.perf_counter()), self.cfg.ppo.batch_size))
        stats.update(source_means(rollouts))
        stats["failures"] = self.recovery.deaths
        stats.update(evaluation)
        if self.recovery.deaths != self.recorded_deaths:  # restarted actors: actors.json names their new processes
            self._record_actors()
        def decode(ids: list[int]) -> str:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

        sources = {name: [v for ro in rollouts for v in ro.source_scores[name]] for name in rollouts[0].source_scores}
        self.run.log_step(stats, {"step": step, "scores": scores, "queries": [decode(q) for q in queries],
                                  "responses": [decode(r) for r in responses], "sources": sources})
        self.metrics.record(stats, {f"rollout-{i}": sent.version - r.weight_version for i, r in enumerate(rollouts)})
        return stats

    def rollout(self, queries: list[list[int]], step: int, sent: Sent, what: str = "rollout",
                for_step: int | None = None) -> Batch:
        """Every shard's Rollout, in shard order, each checked to come from the weights sent.
        ``for_step``: the training step an evaluation's rollout runs in (its own ``step`` is EVAL_STEP)."""
        timeout = self.cfg.cluster.call_timeout_s
        shards = shard_bounds(len(queries), len(self.fleet.rollouts))
        calls = {i: (lambda i=i, a=a, b=b: self.fleet.rollouts[i].rollout.remote(queries[a:b], step, i, timeout))
                 for i, (a, b) in enumerate(shards)}
        at = step if for_step is None else for_step  # the training step this rollout belongs to
        try:
            rollouts = self._gathered(calls, sent, what)
        except RunError as err:
            failure = reward_failure(err.__cause__)
            if failure is None:
                raise
            raise RewardFailed(f"step {at + 1}{'' if what == 'rollout' else f' ({what})'}: {failure}", at) from None
        verify(rollouts, sent)
        return queries, rollouts

    def _gathered(self, calls: dict[int, Any], sent: Sent, what: str) -> list[Rollout]:
        """Every shard's Rollout; a rollout actor restarted between two calls redoes its shard."""
        rollouts = self.recovery.gather(calls, what, self.weights.resend)
        stale = [i for i, r in enumerate(rollouts) if r.weight_version != sent.version]
        if stale:  # restarted between two calls, so no call failed: told by the process id it reports
            restarted = self.recovery.count_deaths(RuntimeError("restarted between calls"), "rollout")
            redo = [i for i in stale if f"rollout-{i}" in restarted]
            self.weights.resend(redo)
            again = self.recovery.gather({i: calls[i] for i in redo}, what, self.weights.resend)
            rollouts = [again[redo.index(i)] if i in redo else r for i, r in enumerate(rollouts)]
        return rollouts

    def evaluate(self, sent: Sent, step: int) -> dict[str, float]:
        """The held-out prompts, sampled by the same rollout actors and scored by the same reward
        actors as training, with the weights just sent and the same seeds every time (at the
        start of training step ``step``); each reward source's mean as eval/reward/<name>."""
        t0 = time.perf_counter()
        _, rollouts = self.rollout(self.eval_queries, EVAL_STEP, sent, what="evaluation", for_step=step)
        scores = np.array([s for ro in rollouts for s in ro.scores], dtype=np.float64)
        return {"eval/reward_mean": float(scores.mean()),
                "eval/reward_std": float(scores.std(ddof=1)) if len(scores) > 1 else 0.0,
                **source_means(rollouts, prefix="eval/reward/"), "time/eval": time.perf_counter() - t0}

    def replace_learner(self, reason: str, ckpt: Path | None = None) -> int:
        """A new learner in the lost one's bundle, at ``ckpt`` (default: the newest good
        checkpoint); the step to redo from. A learner lost again while it starts or loads the
        checkpoint is replaced in turn, each death counted against cluster.max_failures."""
        t0, fixed = time.perf_counter(), ckpt
        while True:
            try:
                self.recovery.replace_learner(reason)
                if fixed is None:
                    ckpt, notes = checkpoint.newest_good(self.run.path)
                    for note in notes:
                        log.warning("%s", note)
                step = self.restore(ckpt)
                break
            except LearnerLost as err:
                reason = f"{err}, while replacing a learner lost earlier"
        self._record_actors()
        log.warning("the learner died (%s); a new learner continues from %s (redoing from step %d), ready in %.1fs",
                    reason, ckpt.name if ckpt else "the start", step + 1, time.perf_counter() - t0)
        return step

    def invariants(self) -> dict[str, Any]:
        """What a resume of this run cannot change, as the checkpoint's manifest records it."""
        plain = lambda v: [asdict(x) for x in v] if isinstance(v, list) else v  # noqa: E731 - reward.sources
        return {name: plain(get_path(self.cfg, name)) for name in FROZEN_ON_RESUME}

    # ---------------------------------------------------------------- files

    def save_checkpoint(self, steps_done: int, before_step: bool = False) -> Path:
        """The checkpoint after ``steps_done`` steps; ``before_step``: as the current step started
        (a stopped step: the learner's state is still the state before it)."""
        data, prefetched = self.step_start if before_step else self._position()
        files = self.recovery.learner_call(self.fleet.learner.state_bytes.remote(), "learner state",
                                           again=lambda: self.fleet.learner.state_bytes.remote())
        driver = {"step": steps_done, "data": vars(data), "seed": self.cfg.run.seed}
        files["driver.json"] = json.dumps(driver).encode()
        if prefetched is not None:
            queries, rollouts = prefetched
            files["prefetch.json"] = json.dumps({"queries": queries, "rollouts": [asdict(r) for r in rollouts]}).encode()
        files.update(self.run.log_bytes())
        return checkpoint.write(self.run.path, steps_done, files, self.cfg.run.keep_checkpoints, self.invariants())

    def restore(self, ckpt: Path | None) -> int:
        """Learner, data position, prefetched batch and logs as at ``ckpt`` (None: the start of the
        run, with a fresh learner). Returns the steps done."""
        if ckpt is None:
            (data, self.prefetched), step = self.first, 0
            self.run.restore_logs(None)
        else:
            files = checkpoint.read(ckpt)
            driver = json.loads(files["driver.json"])
            data, step, batch = DataState(**driver["data"]), driver["step"], files.get("prefetch.json")
            batch = json.loads(batch) if batch else None
            self.prefetched = (batch["queries"], [Rollout(**r) for r in batch["rollouts"]]) if batch else None
            learner_files = {k: files[k] for k in (checkpoint.LEARNER_TENSORS, checkpoint.LEARNER_META)}
            if self.fleet.other_ranks:  # every rank loads; a lost one is the learner's loss
                self.recovery.learner_all([rank.load_state_bytes.remote(learner_files)
                                           for rank in self.fleet.learner_ranks], "restoring the learner")
            else:
                self.recovery.learner_call(self.fleet.learner.load_state_bytes.remote(learner_files),
                                           "restoring the learner",
                                           again=lambda: self.fleet.learner.load_state_bytes.remote(learner_files))
            self.run.restore_logs(ckpt)
        self.stream.load_state(DataState(**vars(data)))
        return step

    def save_policy(self) -> Path:
        files = self.recovery.learner_call(self.fleet.learner.export_policy.remote(), "exporting the policy",
                                           again=lambda: self.fleet.learner.export_policy.remote())
        folder = self.run.path / "policy"
        folder.mkdir(exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        return folder

    def _position(self) -> tuple[DataState, Batch | None]:
        return DataState(**vars(self.stream.state)), self.prefetched

    def _record_actors(self) -> None:
        """actors.json: where each actor runs (pid, node, device, GPU share), for users and the failure tests."""
        self.recorded_deaths = self.recovery.deaths
        actors = {name: {**self.plan.get(name, {}), **ping} for name, ping in self.recovery.pings.items()}
        if self.fleet.other_ranks:  # the learner's other data-parallel ranks, by pid
            pings = self.recovery.learner_call([r.ping.remote() for r in self.fleet.other_ranks], "learner ranks")
            actors["learner"]["rank_pids"] = [p["pid"] for p in pings]
        tmp = self.run.path / f".actors.json.{os.getpid()}"
        tmp.write_text(json.dumps(actors, indent=1))
        os.replace(tmp, self.run.path / "actors.json")  # a reader never sees half a file


def step_stats(step: int, rollouts: list[Rollout], sent: Sent, times: tuple[float, float, float, float],
               batch_size: int) -> dict[str, Any]:
    """The driver's own statistics of a step: timings, weight versions, throughput."""
    t0, t1, t2, t3 = times
    oldest = min(r.weight_version for r in rollouts)
    tokens = sum(len(q) + len(r) for ro in rollouts for q, r in zip(ro.queries, ro.responses))
    return {
        "step": step, "time/broadcast": t1 - t0, "time/rollout": t2 - t1, "time/update": t3 - t2,
        "time/step": t3 - t0, "time/generate": max(r.generate_seconds for r in rollouts),
        "time/score": max(r.score_seconds for r in rollouts),
        "rollout/weight_version": oldest, "rollout/version_lag": sent.version - oldest,
        # every shard trained on was checked against the learner's fingerprint when generated
        "rollout/weights_verified": len(rollouts),
        "samples_per_second": batch_size / (t3 - t0), "tokens_per_second": tokens / (t3 - t0),
    }


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _step_line(stats: dict[str, Any], step: int, steps: int, eta: float) -> str:
    held_out = f"eval {stats['eval/reward_mean']:+.3f}  " if "eval/reward_mean" in stats else ""
    return (f"step {step + 1}/{steps}  reward {stats['env/reward_mean']:+.3f}  {held_out}"
            f"kl {stats['objective/kl']:.3f}  beta {stats['objective/kl_coef']:.3f}  "
            f"gen {stats['time/generate']:.1f}s  score {stats['time/score']:.2f}s  "
            f"update {stats['time/update']:.1f}s  {stats['samples_per_second']:.1f} samples/s  "
            f"eta {_fmt_eta(eta)}")


@dataclass
class Progress:
    """Where the loop stands: the next step, the steps of the newest checkpoint, steps timed."""

    step: int
    last_ckpt: int
    timed: int = 0
    t_start: float = field(default_factory=time.perf_counter)


def run_steps(driver: Driver, cfg: Config, start: int, steps: int) -> Path:
    """The steps, a checkpoint every run.checkpoint_every and at the end, then the tuned policy.
    A learner lost anywhere here (a step, a checkpoint, the export) is replaced and the steps
    since the newest good checkpoint redone; returns the policy's folder."""
    at = Progress(start, start)
    while True:
        try:
            _steps(driver, cfg, at, steps)
            if at.last_ckpt != steps:
                driver.save_checkpoint(steps)
                at.last_ckpt = steps
            return driver.save_policy()
        except LearnerLost as err:
            at.step = at.last_ckpt = driver.replace_learner(str(err))


def _steps(driver: Driver, cfg: Config, at: Progress, steps: int) -> None:
    """The steps from ``at.step`` on; a non-finite value or a failed reward source stops the run,
    its state saved where it can be."""
    while at.step < steps:
        try:
            stats = driver.train_step(at.step, steps)
        except RewardFailed as err:
            raise RunError(f"{err}; {_after_reward_failure(driver, err.step == at.step, at)}") from None
        except NonFiniteError as err:
            raise RunError(f"{err.what} at step {at.step + 1}; {_saved_after(driver, err, at)}") from None
        at.timed += 1
        eta = (time.perf_counter() - at.t_start) / at.timed * (steps - at.step - 1)
        print(_step_line(stats, at.step, steps, eta), flush=True)
        at.step += 1
        if cfg.run.checkpoint_every and at.step % cfg.run.checkpoint_every == 0:
            driver.save_checkpoint(at.step)
            at.last_ckpt = at.step


def _saved_after(driver: Driver, err: NonFiniteError, at: Progress) -> str:
    """Where a stopped run can be resumed from: the state before the step, saved now when it is
    intact and the learner answers, else the newest checkpoint."""
    if err.intact:
        try:
            return f"saved the last good state as {driver.save_checkpoint(at.step, before_step=True)}"
        except LearnerLost as lost:
            return f"the learner died saving the state before it ({lost}); the last good checkpoint is step {at.last_ckpt}"
    return f"the last good checkpoint is step {at.last_ckpt}"


def held_out(cfg: Config, stream: PromptStream) -> list[list[int]]:
    """run.eval_every's prompts: data.eval_prompts of data.eval_split, made as the training prompts
    are and drawn with run.seed, so every evaluation of the run scores the same ones."""
    d = cfg.data
    queries, _ = held_out_prompts(load_texts(d.dataset, d.eval_split, d.text_column), stream.prompts,
                                  d.eval_prompts, cfg.run.seed)
    if len(queries) < cfg.cluster.num_rollout_workers:
        raise ConfigError(f"data.eval_split '{d.eval_split}': {len(queries)} texts longer than {d.min_chars} "
                          f"characters, fewer than cluster.num_rollout_workers ({cfg.cluster.num_rollout_workers})")
    return queries


def _after_reward_failure(driver: Driver, own_rollout: bool, at: Progress) -> str:
    """Where the run can continue from after a reward source failed. In the step's own rollout
    (or its evaluation) the learner is untouched, so the state before the step is saved, unless a
    checkpoint of it exists (never rewritten); in the next step's rollout, generated during this
    step's update (ppo.max_lag=1), the update is in flight: the newest checkpoint is the last good state."""
    saved = {c.name for c in checkpoint.list_checkpoints(driver.run.path)}
    if own_rollout and f"{checkpoint.PREFIX}{at.step:06d}" not in saved:
        return _saved_after(driver, NonFiniteError("a failed reward", intact=True), at)
    return f"the last good checkpoint is step {at.last_ckpt}" if saved else "no checkpoint was written yet"


def train(cfg: Config, functions: dict[str, RewardFunction] | None = None) -> Path:
    """1. data and checks  2. Ray and actors  3. resume  4. the steps  5. checkpoint + policy
    6. report. ``functions``: Python reward functions given as objects, by the reward.function
    string that names them (learner.train(reward=...))."""
    import ray

    from learner.orchestration import placement

    # 1. everything that can fail fast fails before Ray starts
    resume_from = None
    if cfg.run.resume:
        _, resume_from, notes = checkpoint.find_resumable(Path(cfg.run.resume))
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    check_models(cfg)
    check_rewards(cfg, functions)
    tokenizer = load_tokenizer(cfg.policy)
    stream = PromptStream(load_texts(cfg.data.dataset, cfg.data.split, cfg.data.text_column), tokenizer,
                          cfg.data, cfg.ppo.batch_size, cfg.run.seed)
    check_context(cfg, stream.prompts.longest)
    eval_queries = held_out(cfg, stream) if cfg.run.eval_every else None
    steps = cfg.run.steps or stream.steps_per_epoch
    done = checkpoint.manifest(resume_from)["step"] if resume_from else 0
    if steps < done:
        raise ConfigError(f"run.steps ({steps}, one pass over the data) is below the {done} steps the checkpoint "
                          f"has done; pass --run.steps {done} or more")
    run = RunDir(cfg)

    # 2. Ray, resources, actors
    info = placement.connect(cfg, namespace=f"ppo-{run.path.name}")
    print(f"Ray dashboard: {info['dashboard_url'] or 'not running'}  |  run directory: {run.path}", flush=True)
    try:
        driver = Driver(cfg, run, stream, tokenizer, eval_queries, functions)
        for name, where in driver.plan.items():
            ranks = f"  each of {where['ranks']} DDP ranks" if where.get("ranks", 1) > 1 else ""
            print(f"plan: {name:<10} on {where['node']}  {where['gpus']:g} GPU  {where['cpus']:g} CPU  "
                  f"({where['device']}){ranks}", flush=True)
        # 3. resume (a learner lost while it loads the checkpoint is replaced, at that checkpoint)
        start = 0
        if resume_from is not None:
            try:
                start = driver.restore(resume_from)
            except LearnerLost as err:
                start = driver.replace_learner(str(err), resume_from)
            print(f"resumed from {resume_from} at step {start + 1}", flush=True)
        # 4. the steps, 5. the last checkpoint and the tuned policy
        print(f"tuned policy saved to {run_steps(driver, cfg, start, steps)}", flush=True)
    finally:
        ray.shutdown()
        run.close()  # trackers: flush TensorBoard, finish the W&B run
    # 6. the figure and the before/after table (python -m learner.report RUN_DIR redoes them)
    if cfg.run.report_queries:
        from learner.records.report import make_report

        report = make_report(run.path, n_queries=cfg.run.report_queries, seed=cfg.run.seed, functions=functions)
        print(f"reward figure: {report['figure']}  |  before/after table: {report['markdown']}  "
              f"(mean reward {report['mean_before']:+.3f} -> {report['mean_after']:+.3f})", flush=True)
    return run.path
