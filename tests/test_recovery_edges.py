"""The edges of recovery, without a cluster: a learner lost outside the step loop (the final
checkpoint, the policy export) or during its own replacement, each death counted against
cluster.max_failures and the old learner killed; a restart told by the id a process reports
even where its pid is reused; an unreachable actor waited for rather than replaced.

The driver's real loop (``run_steps``) and its real checkpoint, restore and export code run
against fake learner handles that die on cue (the fakes of tests/test_recovery.py)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from learner.config import Config, set_path
from learner.orchestration.data import DataState
from learner.orchestration.driver import Driver, run_steps
from learner.orchestration.recovery import Fleet, LearnerLost, Recovery, RunError
from learner.records import checkpoint
from learner.records.rundir import RunDir

from test_recovery import Died, FakeActor, FakeCalls, Unreachable, _recovery, _rollout_calls


class RemoteMethods:
    """``handle.method.remote(*args)`` as a Ray handle has it: a ref that answers when fetched."""

    def __getattr__(self, method: str):
        actor = self

        class Method:
            def remote(self, *args):
                return lambda: actor.answer(method, args)
        return Method()


class FakeLearner(RemoteMethods):
    """A learner handle whose process dies at the n-th call of a method (``dies_at``): that call
    and every later one, pings included, raise Died. ``unreachable_at`` makes one call raise
    Unreachable while the process lives on."""

    def __init__(self, name: str, dies_at: tuple[str, int] | None = None,
                 unreachable_at: tuple[str, int] | None = None) -> None:
        self.name, self.dies_at, self.unreachable_at = name, dies_at, unreachable_at
        self.instance, self.dead, self.version, self.calls = uuid.uuid4().hex, False, 0, []


    def answer(self, method: str, args):
        if self.dead:
            raise Died(f"{self.name} died")
        self.calls.append(method)
        count = self.calls.count(method)
        if self.dies_at == (method, count):
            self.dead = True
            raise Died(f"{self.name} died in {method}")
        if self.unreachable_at == (method, count):
            raise Unreachable(f"{self.name} is unreachable")
        if method == "ping":
            return {"pid": 1, "instance": self.instance}
        if method == "step":
            self.version += 1
            return {"env/reward_mean": 0.1 * self.version, "objective/kl": 0.0, "objective/kl_coef": 0.2}
        if method == "state_bytes":
            return {"learner.safetensors": _safetensors(), "learner.json": json.dumps(_meta(self.version)).encode()}
        if method == "load_state_bytes":
            self.version = json.loads(args[0]["learner.json"])["version"]
            return self.version
        if method == "export_policy":
            return {"config.json": json.dumps({"version": self.version}).encode()}
        raise AssertionError(method)


def _meta(version: int) -> dict:
    return {"kl_coef": 0.2, "numpy_rng": {}, "version": version, "aliases": {}, "optimizer_param_groups": [],
            "optimizer_scalars": {}}


def _safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"x": torch.zeros(2)})


class FakeStream:
    def __init__(self) -> None:
        self.state = DataState()

    def load_state(self, state: DataState) -> None:
        self.state = DataState(state.epoch, state.position)


def _driver(tmp_path: Path, learners: list[FakeLearner], max_failures: int = 3) -> tuple[Driver, FakeCalls]:
    """The real Driver's loop, checkpoints, restore and export over fake learners: the first of
    ``learners`` runs first, each replacement takes the next."""
    cfg = Config()
    for name, value in (("run.out_dir", str(tmp_path)), ("run.name", "r"), ("run.checkpoint_every", 2)):
        set_path(cfg, name, value)
    driver = Driver.__new__(Driver)
    calls = FakeCalls()
    queue = iter(learners[1:])
    driver.cfg, driver.run, driver.stream, driver.plan, driver.prefetched = cfg, RunDir(cfg), FakeStream(), {}, None
    driver.recorded_deaths = 0
    driver.recovery = Recovery(Fleet(learners[0], [], []), calls, timeout_s=5, max_failures=max_failures,
                               start_learner=lambda: next(queue), poll_s=0)
    driver.recovery.start()
    driver.fleet = driver.recovery.fleet
    driver.first = driver.step_start = driver._position()

    def train_step(step: int, steps: int) -> dict:
        driver.step_start = driver._position()
        driver.stream.state.position += 8
        stats = driver.recovery.learner_call(driver.fleet.learner.step.remote(), "PPO step")
        stats.update({"step": step, "time/generate": 0.0, "time/score": 0.0, "time/update": 0.0,
                      "samples_per_second": 1.0})
        driver.run.log_step(stats, {"step": step})
        return stats

    driver.train_step = train_step
    return driver, calls


def _logged_steps(driver: Driver) -> list[int]:
    return [json.loads(line)["step"] for line in driver.run.stats_file.read_text().splitlines()]


@pytest.mark.parametrize("dies_at, redone", [
    (("export_policy", 1), []),  # after the final checkpoint: only the export is redone
    (("state_bytes", 3), ["step"]),  # at the final checkpoint (step 5): step 5 is redone from step-000004
])
def test_a_learner_lost_at_the_end_is_replaced_and_the_run_finishes(tmp_path, capsys, dies_at, redone):
    first, second = FakeLearner("learner", dies_at=dies_at), FakeLearner("learner-1")
    driver, calls = _driver(tmp_path, [first, second])
    policy = run_steps(driver, driver.cfg, 0, 5)
    assert json.loads((policy / "config.json").read_text()) == {"version": 5}
    assert driver.recovery.deaths == 1 and calls.killed == [first] and driver.fleet.learner is second
    assert second.calls == ["ping", "load_state_bytes", *redone, "state_bytes" if redone else "export_policy",
                            *(["export_policy"] if redone else [])]
    assert _logged_steps(driver) == [0, 1, 2, 3, 4]
    assert checkpoint.manifest(checkpoint.list_checkpoints(driver.run.path)[-1])["step"] == 5


def test_a_learner_lost_during_its_replacement_is_replaced_again_each_death_counted(tmp_path):
    """The first learner dies in step 4; its replacement dies loading the step-2 checkpoint; the
    third redoes steps 3 and 4. Two deaths; the logs hold each step once."""
    learners = [FakeLearner("learner", dies_at=("step", 4)), FakeLearner("learner-1", dies_at=("load_state_bytes", 1)),
                FakeLearner("learner-2")]
    driver, calls = _driver(tmp_path, learners)
    run_steps(driver, driver.cfg, 0, 4)
    assert driver.recovery.deaths == 2 and calls.killed == learners[:2]
    assert learners[2].calls.count("step") == 2 and learners[2].version == 4
    assert _logged_steps(driver) == [0, 1, 2, 3]


def test_deaths_during_replacement_count_against_the_budget(tmp_path):
    learners = [FakeLearner("learner", dies_at=("step", 3)), FakeLearner("learner-1", dies_at=("ping", 1))]
    driver, _ = _driver(tmp_path, learners, max_failures=1)
    with pytest.raises(RunError, match=r"2 actor deaths exceed cluster.max_failures=1$"):
        run_steps(driver, driver.cfg, 0, 4)


def test_an_unreachable_learner_is_waited_for_and_a_repeatable_call_made_again(tmp_path):
    """Unreachable during the export (repeatable): made again, nobody replaced. Unreachable
    during a step (it may have happened): the learner is replaced."""
    learner = FakeLearner("learner", unreachable_at=("export_policy", 1))
    driver, calls = _driver(tmp_path, [learner])
    run_steps(driver, driver.cfg, 0, 2)
    assert driver.recovery.deaths == 0 and calls.killed == [] and learner.calls.count("export_policy") == 2
    step = FakeLearner("learner", unreachable_at=("step", 1))
    driver, calls = _driver(tmp_path / "2", [step])
    with pytest.raises(LearnerLost, match="unreachable"):
        driver.train_step(0, 2)


class SamePidActor(FakeActor):
    """Ray restarts it as a new process that happens to get the old pid (a container, another
    node): only the id its process reports tells the restart."""

    def restart(self) -> None:
        self.instance = uuid.uuid4().hex

    def answer(self, method: str, args):
        if method == "ping" and not self.down:
            return {"pid": self.pid, "instance": getattr(self, "instance", "first")}
        return super().answer(method, args)


def test_a_restart_with_a_reused_pid_is_seen_and_gets_the_weights():
    rec, fleet, _ = _recovery(n_rollouts=2)
    fleet.rollouts[1] = SamePidActor("rollout-1")
    rec.start()
    fleet.rollouts[1].restart()
    fleet.rollouts[1].fail = [Died("rollout-1 died")]
    resent = []
    rec.gather(_rollout_calls(fleet), "rollout", resent.append)
    assert rec.deaths == 1 and resent == [[1]]


def test_an_unreachable_rollout_actor_is_waited_for_not_counted():
    rec, fleet, _ = _recovery(n_rollouts=2)
    fleet.rollouts[0].fail = [Unreachable("rollout-0 is unreachable")]
    fleet.rollouts[0].down = 2  # its pings fail for a while too
    resent = []
    assert rec.gather(_rollout_calls(fleet), "rollout", resent.append)[0] == "rollout-0:rollout()"
    assert rec.deaths == 0 and resent == [[]]


class FakeRollout(RemoteMethods):
    """A rollout actor handle: holds a weight version; Ray restarting it (``restart``) gives a
    new process that holds the weights it loaded from disk (version 0)."""

    def __init__(self) -> None:
        self.instance, self.version, self.loads = uuid.uuid4().hex, 0, 0

    def restart(self) -> None:
        self.instance, self.version = uuid.uuid4().hex, 0


    def answer(self, method: str, args):
        from types import SimpleNamespace

        if method == "ping":
            return {"pid": 7, "instance": self.instance}
        if method == "load_weights":
            self.version, self.loads = args[1], self.loads + 1
            return self.version
        return SimpleNamespace(weight_version=self.version, weight_fingerprint=[float(self.version)])


def test_a_rollout_actor_restarted_between_calls_gets_the_weights_before_its_shard_counts():
    """Ray restarted rollout-1 after it loaded this step's weights and before its rollout call:
    no call failed, yet its new process is seen (its id), given the weights, and its shard redone."""
    from learner.orchestration.weights import Broadcast, Sent

    rollouts = [FakeRollout(), FakeRollout()]
    calls = FakeCalls()
    recovery = Recovery(Fleet(FakeLearner("learner"), rollouts, []), calls, timeout_s=5, max_failures=3,
                        start_learner=lambda: None, poll_s=0)
    recovery.start()
    driver = Driver.__new__(Driver)
    driver.cfg, driver.fleet, driver.recovery, driver.shards = Config(), recovery.fleet, recovery, [(0, 1), (1, 2)]
    driver.weights = Broadcast(recovery.fleet, recovery)
    sent = driver.weights.last = Sent(3, "weights", [3.0])
    for r in rollouts:
        r.version = 3
    rollouts[1].restart()
    _, got = driver.rollout([[1], [2]], 0, sent)
    assert [r.weight_version for r in got] == [3, 3]
    assert recovery.deaths == 1 and rollouts[1].loads == 1 and rollouts[0].loads == 0
