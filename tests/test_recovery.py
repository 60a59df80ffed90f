"""Nothing lost, nobody in, without a cluster: the learner's state round-trips exactly through
data-only files, a non-finite step leaves the state before it, checkpoints that are damaged
or carry code are refused, fingerprints catch a worker with wrong weights, and the recovery
unit restarts dead actors (fake handles that die on cue) counting each death once."""
from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch

from learner.records import checkpoint
from learner.config import PPOConfig
from learner.core.actor import LearnerActor
from learner.core.learner import NonFiniteError

CFG = PPOConfig(learning_rate=1e-3, batch_size=8, mini_batch_size=4, ppo_epochs=2, init_kl_coef=0.05)


def _batch(k: int) -> tuple[list[list[int]], list[list[int]], list[float]]:
    gen = torch.Generator().manual_seed(k)
    queries = torch.randint(3, 280, (CFG.batch_size, 3), generator=gen).tolist()
    responses = torch.randint(3, 280, (CFG.batch_size, 5), generator=gen).tolist()
    return queries, responses, torch.rand(CFG.batch_size, generator=gen).tolist()


def _learner(policy: Path) -> LearnerActor:
    return LearnerActor(str(policy), CFG, seed=0, device="cpu", torch_threads=1)


def test_learner_state_round_trips_exactly_without_pickle(tiny_policy: Path):
    a = _learner(tiny_policy)
    a.step(*_batch(0))
    files = a.state_bytes()
    assert set(files) == {"learner.safetensors", "learner.json"}
    assert not any(f.startswith(b"\x80") for f in files.values())  # no pickle protocol header
    b = _learner(tiny_policy)
    assert b.load_state_bytes(files) == a.version == 1
    want, got = a.step(*_batch(1)), b.step(*_batch(1))
    for key in want:
        if not key.startswith("time/"):
            assert got[key] == want[key], key
    assert b.state_bytes() == a.state_bytes()


def test_non_finite_gradient_stops_before_the_update_and_keeps_the_state(tiny_policy: Path):
    """A NaN injected into one gradient (a hook from outside the product) stops the step
    before Adam moves; the state then is the state before the step, RNGs included, and it
    restores exactly."""
    a = _learner(tiny_policy)
    a.step(*_batch(0))
    before = a.state_bytes()
    param = a.learner.model.v_head.summary.weight if hasattr(a.learner.model.v_head, "summary") else next(a.learner.model.v_head.parameters())
    hook = param.register_hook(lambda g: g * float("nan"))
    with pytest.raises(NonFiniteError) as err:
        a.step(*_batch(1))
    hook.remove()
    assert err.value.intact and err.value.what == "non-finite gradient"
    assert a.state_bytes() == before
    b = _learner(tiny_policy)
    b.load_state_bytes(before)
    assert b.step(*_batch(1))["ppo/loss/total"] == a.step(*_batch(1))["ppo/loss/total"]


def test_non_finite_values_stop_the_step(tiny_policy: Path):
    a = _learner(tiny_policy)
    before = a.state_bytes()
    with torch.no_grad():
        next(a.learner.model.v_head.parameters()).fill_(float("inf"))
    with pytest.raises(NonFiniteError, match="non-finite"):
        a.step(*_batch(0))
    assert a.version == 0
    assert json.loads(a.state_bytes()["learner.json"])["numpy_rng"] == json.loads(before["learner.json"])["numpy_rng"]


# ----------------------------------------------------------------------------- checkpoints hold no code

def _checkpoint(run_dir: Path, step: int, extra: dict[str, bytes] | None = None) -> Path:
    learner = {"kl_coef": 0.2, "numpy_rng": {}, "version": step, "aliases": {}, "optimizer_param_groups": [],
               "optimizer_scalars": {}}
    driver = {"step": step, "data": {"epoch": 0, "position": 0}, "seed": 0}
    files = {"learner.safetensors": _safetensors(), "learner.json": json.dumps(learner).encode(),
             "driver.json": json.dumps(driver).encode(),
             "stats.jsonl": b"", "rollouts.jsonl": b"", **(extra or {})}
    return checkpoint.write(run_dir, step, {k: v for k, v in files.items() if k in checkpoint.REQUIRED
                                            or k in checkpoint.OPTIONAL}, keep_last=5)


def _safetensors() -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(2)})


def _set_manifest_entry(ckpt: Path, name: str, data: bytes) -> None:
    """What an attacker can do: add a file and fix the manifest's checksums to match."""
    (ckpt / name).write_bytes(data)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


class _Payload:
    """Unpickling this runs code: it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_payload_in_a_checkpoint_is_refused(tmp_path: Path):
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("{}")
    _checkpoint(run_dir, 1)
    newest = _checkpoint(run_dir, 2)
    marker = tmp_path / "code-ran"
    _set_manifest_entry(newest, "learner.pt", pickle.dumps(_Payload(marker)))
    _, ckpt, notes = checkpoint.find_resumable(run_dir)
    assert ckpt.name == "step-000001"
    assert notes == [("checkpoint step-000002 is unusable (unexpected file learner.pt: a checkpoint holds only "
                      "safetensors and JSON); falling back to an older one")]
    # The same payload in place of the tensors file is refused too, and never unpickled.
    newest = _checkpoint(run_dir, 3)
    _set_manifest_entry(newest, "learner.safetensors", pickle.dumps(_Payload(marker)))
    assert checkpoint.verify(newest) == "learner.safetensors is not valid safetensors"
    assert checkpoint.find_resumable(run_dir)[1].name == "step-000001"
    assert not marker.exists()


@pytest.mark.parametrize("damage, reason", [
    (lambda c: (c / "MANIFEST.json").write_text("{not json"), "no readable manifest"),
    (lambda c: (c / "MANIFEST.json").write_text('{"files": [1, 2]}'), "malformed manifest"),
    (lambda c: (c / "MANIFEST.json").write_text('{"files": {"driver.json": {"bytes": "x", "sha256": 1}}}'),
     "malformed manifest"),
    (lambda c: _drop_from_manifest(c, "driver.json"), "the manifest does not list driver.json"),
    (lambda c: (c / "stats.jsonl").unlink(), "stats.jsonl is missing"),
    (lambda c: (c / "driver.json").write_bytes(b'{"step": 9}'), "driver.json does not match its checksum"),
])
def test_a_damaged_checkpoint_is_one_line_and_a_fall_back(tmp_path: Path, damage, reason):
    run_dir = tmp_path
    (run_dir / "config.yaml").write_text("{}")
    _checkpoint(run_dir, 1)
    damage(_checkpoint(run_dir, 2))
    _, ckpt, notes = checkpoint.find_resumable(run_dir)
    assert ckpt.name == "step-000001"
    assert notes == [f"checkpoint step-000002 is unusable ({reason}); falling back to an older one"]


def _drop_from_manifest(ckpt: Path, name: str) -> None:
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    del manifest["files"][name]
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


# ----------------------------------------------------------------------------- weights verified

def test_a_worker_with_corrupted_weights_is_caught_by_its_fingerprint(policy_dir: Path):
    """Two plain rollout workers load the same weights; one is then damaged in place (as a
    silently failed update would leave it). The check names that worker."""
    from actors.fingerprint import fingerprint
    from actors.rollout import RolloutSettings, RolloutWorker
    from learner.orchestration.weights import Sent, verify
    from learner.orchestration.recovery import RunError

    workers = [RolloutWorker(RolloutSettings(policy=str(policy_dir), seed=0)) for _ in range(2)]
    weights = workers[0].get_weights()
    for w in workers:
        w.load_weights(weights, 3)
    sent = Sent(3, None, fingerprint(torch.as_tensor(v) for v in weights.values()))
    queries = [[464, 3807, 373], [40, 1842]]
    rollouts = [w.generate(queries, step=0, shard=i) for i, w in enumerate(workers)]
    verify(rollouts, sent)  # the same weights: no error
    with torch.no_grad():
        next(workers[1].model.parameters()).mul_(1.01)
    rollouts = [w.generate(queries, step=0, shard=i) for i, w in enumerate(workers)]
    with pytest.raises(RunError, match=r"^rollout-1 generated with weights that differ from the learner's version 3"):
        verify(rollouts, sent)


def test_learner_and_worker_fingerprints_agree(tiny_policy: Path):
    from actors.rollout import RolloutSettings, RolloutWorker

    learner = _learner(tiny_policy)
    learner.step(*_batch(0))
    version, want = learner.weights_fingerprint()
    worker = RolloutWorker(RolloutSettings(policy=str(tiny_policy)))
    worker.load_weights(learner.get_weights(), version)
    assert worker.weight_fingerprint() == want


# ----------------------------------------------------------------------------- the recovery unit, fake actors

class Died(Exception):
    """Stands for Ray's RayActorError: the actor called is gone."""


class TaskFailed(Exception):
    """Stands for Ray's RayTaskError: the call raised; ``cause`` is what it raised."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


class Unreachable(Died):
    """Stands for Ray's ActorUnavailableError: the actor may come back, the same process."""


class FakeCalls:
    lost, unavailable, timeout = (Died,), (Unreachable,), TimeoutError

    def __init__(self) -> None:
        self.killed = []

    def kill(self, handle):
        self.killed.append(handle)

    def get(self, refs, timeout_s):
        return [r() for r in refs] if isinstance(refs, list) else refs()

    def wait_one(self, refs, timeout_s):
        return refs[0]


class FakeActor:
    """``actor.method.remote(...)`` returns a thunk; errors queued in ``fail`` are raised by the
    next calls (not by pings); ``restart()`` is Ray bringing the actor back as a new process."""

    pids = iter(range(1000, 10**6))

    def __init__(self, name: str) -> None:
        self.name, self.pid, self.fail, self.calls, self.down = name, next(self.pids), [], [], 0

    def restart(self) -> None:
        self.pid = next(self.pids)

    def __getattr__(self, method: str):
        actor = self

        class Method:
            def remote(self, *args):
                return lambda: actor.answer(method, args)
        return Method()

    def answer(self, method: str, args):
        if method == "ping":
            if self.down:  # still restarting
                self.down -= 1
                raise Died(f"{self.name} is restarting")
            return {"pid": self.pid}
        self.calls.append(method)
        if self.fail:
            raise self.fail.pop(0)
        return f"{self.name}:{method}{args}"


def _recovery(n_rollouts: int = 4, max_failures: int = 3):
    from learner.orchestration.recovery import Fleet, Recovery

    fleet = Fleet(FakeActor("learner"), [FakeActor(f"rollout-{i}") for i in range(n_rollouts)], [FakeActor("rewards-0")])
    new_learners = []
    rec = Recovery(fleet, FakeCalls(), timeout_s=5, max_failures=max_failures, poll_s=0,
                   start_learner=lambda: new_learners.append(FakeActor("learner-2")) or new_learners[-1:])
    rec.start()
    return rec, fleet, new_learners


def _rollout_calls(fleet) -> dict:
    return {i: (lambda a=a: a.rollout.remote()) for i, a in enumerate(fleet.rollouts)}


def test_one_reward_actor_death_failing_every_shard_counts_once():
    rec, fleet, _ = _recovery(n_rollouts=4, max_failures=1)
    fleet.rewards[0].restart()
    fleet.rewards[0].down = 2
    for a in fleet.rollouts:  # the reward actor's death fails every rollout actor's call
        a.fail = [TaskFailed(Died("rewards-0 died"))]
    resent = []
    results = rec.gather(_rollout_calls(fleet), "rollout", resent.append)
    assert results == [f"rollout-{i}:rollout()" for i in range(4)]
    assert rec.deaths == 1
    assert resent == [[], [], [], []]  # no rollout actor restarted: its weights are current
    assert all(a.calls == ["rollout", "rollout"] for a in fleet.rollouts)


def test_a_restarted_rollout_actor_gets_the_weights_before_its_work_is_redone():
    rec, fleet, _ = _recovery()
    fleet.rollouts[2].restart()
    fleet.rollouts[2].fail = [Died("rollout-2 died")]
    resent = []
    rec.gather(_rollout_calls(fleet), "rollout", resent.append)
    assert rec.deaths == 1 and resent == [[2]]


def test_deaths_beyond_the_budget_stop_the_run_in_one_line():
    from learner.orchestration.recovery import RunError

    rec, fleet, _ = _recovery(max_failures=1)
    for i in (0, 1):
        fleet.rollouts[i].restart()
        fleet.rollouts[i].fail = [Died(f"rollout-{i} died")]
    with pytest.raises(RunError, match=r"2 actor deaths exceed cluster.max_failures=1$"):
        rec.gather(_rollout_calls(fleet), "rollout", lambda _: None)


def test_a_real_error_in_a_call_is_not_retried():
    from learner.orchestration.recovery import RunError

    rec, fleet, _ = _recovery()
    fleet.rollouts[3].fail = [TaskFailed(ValueError("bad query\nremote traceback..."))]
    with pytest.raises(RunError, match=r"^rollout on rollout-3 failed: ValueError: bad query$"):
        rec.gather(_rollout_calls(fleet), "rollout", lambda _: None)
    assert rec.deaths == 0


def test_a_lost_learner_is_replaced_and_counted():
    from learner.orchestration.recovery import LearnerLost

    rec, fleet, started = _recovery()
    fleet.learner.fail = [Died("the actor died unexpectedly")]
    with pytest.raises(LearnerLost, match="Died: the actor died unexpectedly"):
        rec.learner_call(fleet.learner.step.remote(), "PPO step")
    new = rec.replace_learner("Died: the actor died unexpectedly")
    assert started == [new] and fleet.learner is new and rec.deaths == 1
    assert rec.pings["learner"]["pid"] == new.pid


def test_a_lost_learner_rank_is_a_lost_learner_and_the_whole_group_is_replaced():
    """A step runs on every rank. Rank 1 gone while rank 0's collective fails on it: the learner
    is lost (not rank 0's error), and the replacement is a whole new group from start_learner."""
    from learner.orchestration.recovery import LearnerLost

    rec, fleet, _ = _recovery()
    fleet.other_ranks = [FakeActor("learner-rank1")]
    fleet.learner.fail = [TaskFailed(RuntimeError("Connection closed by peer"))]
    fleet.other_ranks[0].fail, fleet.other_ranks[0].down = [Died("rank 1 died")], 10**6
    with pytest.raises(LearnerLost, match="rank 1 died|restarting"):
        rec.learner_all([r.step.remote() for r in fleet.learner_ranks], "PPO step")
    group = [FakeActor("learner-1"), FakeActor("learner-1-rank1")]
    rec.start_learner = lambda: group
    assert rec.replace_learner("rank 1 died") is group[0] and fleet.learner_ranks == group


def test_a_rank_lost_while_the_new_group_joins_is_a_lost_learner_again():
    """The driver replaces the learner again (each death counted) when a rank of the new group
    dies while the ranks join, rather than stopping on Ray's error."""
    from learner.orchestration.recovery import LearnerLost

    rec, fleet, _ = _recovery()

    def join_fails():
        raise Died("learner-rank1 died while joining")
    rec.start_learner = join_fails
    with pytest.raises(LearnerLost, match=r"a rank of the new learner died while the ranks joined \(.*joining\)"):
        rec.replace_learner("rank 1 died")
    assert rec.deaths == 1
    group = [FakeActor("learner-2"), FakeActor("learner-2-rank1")]
    rec.start_learner = lambda: group
    assert rec.replace_learner("a rank of the new learner died") is group[0] and rec.deaths == 2


def test_an_error_every_learner_rank_meets_is_raised_as_it_is():
    rec, fleet, _ = _recovery()
    fleet.other_ranks = [FakeActor("learner-rank1")]
    for rank in fleet.learner_ranks:
        rank.fail = [TaskFailed(ValueError("step needs ppo.batch_size=8 rollouts"))]
    with pytest.raises(TaskFailed, match="batch_size=8"):
        rec.learner_all([r.step.remote() for r in fleet.learner_ranks], "PPO step")
    assert rec.deaths == 0
    fleet.learner, fleet.other_ranks = FakeActor("learner"), [FakeActor("learner-rank1")]
    assert rec.learner_all([r.step.remote(1) for r in fleet.learner_ranks], "PPO step") == "learner:step(1,)"


def test_fingerprint_sees_a_change_in_any_slice_of_a_large_tensor():
    from actors.fingerprint import fingerprint, same

    big = torch.zeros(2**25 + 3)  # beyond float32's exact integers: indices must stay exact
    want = fingerprint([big])
    for i in (0, 2**24 + 1, 2**25 + 2):
        damaged = big.clone()
        damaged[i] = 1.0
        assert not same(fingerprint([damaged]), want), i


def test_non_finite_error_crosses_the_actor_boundary():
    """Ray pickles a remote error to the driver: both fields must survive."""
    err = pickle.loads(pickle.dumps(NonFiniteError("non-finite gradient", intact=True)))
    assert (err.what, err.intact, str(err)) == ("non-finite gradient", True, "non-finite gradient")


def test_a_call_lost_again_and_again_with_nobody_dying_stops():
    from learner.orchestration.recovery import RunError

    rec, fleet, _ = _recovery(max_failures=1)
    fleet.rollouts[0].fail = [Died("unavailable")] * 5
    with pytest.raises(RunError, match=r"^rollout on rollout-0 failed 3 times: Died: unavailable$"):
        rec.gather(_rollout_calls(fleet), "rollout", lambda _: None)
    assert rec.deaths == 0
