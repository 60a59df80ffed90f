"""Collective weight broadcast (gloo on CPU): a sender and two rollout workers as Ray actors.

Every worker holds the sender's weights bit for bit and the version sent; a layout mismatch
raises on the receivers without hanging anyone; the group can be torn down and rebuilt on a
new port with the same actors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actors import collective
from actors.rollout import RolloutSettings, RolloutWorker, tied_duplicates

TIMEOUT_S = 30.0


def _get(refs, timeout: float = 2 * TIMEOUT_S):
    """ray.get, never unbounded: a lost actor fails the test instead of hanging it."""
    import ray

    return ray.get(refs, timeout=timeout)


def test_header_round_trip_and_layout_checks():
    tensors = [torch.zeros(3, 4), torch.zeros(5, dtype=torch.int64), torch.zeros(2)]
    header = collective.make_header(7, tensors)
    assert header.shape == (collective.HEADER_LEN,) and header.dtype == torch.int64
    parsed = collective.parse_header(header)
    assert parsed["version"] == 7 and parsed["n_tensors"] == 3 and parsed["numel"] == 19
    assert parsed["groups"] == [(torch.float32, 14), (torch.int64, 5)]
    # Same sizes, other shapes: only the fingerprint tells them apart.
    other = collective.parse_header(collective.make_header(7, [torch.zeros(4, 3), *tensors[1:]]))
    assert other["numel"] == parsed["numel"] and other["fingerprint"] != parsed["fingerprint"]
    assert collective.local_init_method("127.0.0.1").startswith("tcp://127.0.0.1:")


def test_gloo_broadcast_rebuild_and_mismatch(ray_local, policy_dir: Path):
    ray = ray_local

    class Sender:
        """Stands in for the learner: the same causal LM, weights perturbed deterministically."""

        def __init__(self, policy: str) -> None:
            from transformers import AutoModelForCausalLM

            torch.set_num_threads(1)
            self.model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
            self.group = None

        def perturb(self, seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for t in collective.lm_tensors(self.model):
                    t.add_(0.01 * torch.randn(t.shape, generator=gen))

        def address(self) -> str:
            return collective.local_init_method()

        def join(self, init_method: str, world_size: int) -> None:
            # keep_buffers=False here, the default (True) on the receivers: both ways are covered.
            self.group = collective.WeightGroup(init_method, 0, world_size, "gloo", TIMEOUT_S, group_name="test",
                                                keep_buffers=False)

        def send(self, version: int, drop_last: bool = False) -> None:
            tensors = collective.lm_tensors(self.model)
            collective.send(self.group, version, tensors[:-1] if drop_last else tensors)

        def leave(self) -> None:
            self.group.destroy()

        def weights(self) -> dict[str, np.ndarray]:
            tied = tied_duplicates(self.model)
            return {name: t.detach().cpu().numpy().copy()
                    for name, t in self.model.state_dict().items() if name not in tied}

    sender = ray.remote(Sender).options(num_cpus=0).remote(str(policy_dir))
    settings = RolloutSettings(policy=str(policy_dir), torch_threads=1)
    workers = [ray.remote(RolloutWorker).options(num_cpus=0).remote(settings) for _ in range(2)]
    world = len(workers) + 1

    def join_all() -> None:
        addr = _get(sender.address.remote())
        _get([sender.join.remote(addr, world)] +
                [w.join_weight_group.remote(addr, i + 1, world, "gloo", TIMEOUT_S) for i, w in enumerate(workers)],
                timeout=2 * TIMEOUT_S)
        return addr

    def broadcast_and_check(version: int, seed: int) -> None:
        _get(sender.perturb.remote(seed))
        sent = _get(sender.weights.remote())
        got_versions = _get([sender.send.remote(version)] + [w.receive_weights.remote() for w in workers],
                               timeout=2 * TIMEOUT_S)[1:]
        assert got_versions == [version] * len(workers)
        for got in _get([w.get_weights.remote() for w in workers]):
            assert set(got) == set(sent)
            for name, value in sent.items():
                np.testing.assert_array_equal(got[name], value, err_msg=name)
        assert [p["weight_version"] for p in _get([w.ping.remote() for w in workers])] == [version] * len(workers)

    before = _get(workers[0].get_weights.remote())
    first = join_all()
    broadcast_and_check(version=3, seed=1)
    assert not np.array_equal(before["transformer.wte.weight"], _get(workers[0].get_weights.remote())[
        "transformer.wte.weight"])

    # A layout mismatch: receivers raise a clear error (no one hangs) and keep their weights and version.
    held = _get(workers[1].get_weights.remote())
    refs = [sender.send.remote(99, drop_last=True)] + [w.receive_weights.remote() for w in workers]
    _get(refs[0], timeout=2 * TIMEOUT_S)
    for ref in refs[1:]:
        with pytest.raises(ray.exceptions.RayTaskError, match="do not match this receiver"):
            _get(ref, timeout=2 * TIMEOUT_S)
    assert [p["weight_version"] for p in _get([w.ping.remote() for w in workers])] == [3, 3]
    after = _get(workers[1].get_weights.remote())
    assert all(np.array_equal(after[k], v) for k, v in held.items())

    # The group is still aligned after the mismatch: another broadcast goes through.
    broadcast_and_check(version=4, seed=2)

    # Tear down and rebuild on a new port with the same actors (as after an actor restart).
    _get([sender.leave.remote()] + [w.leave_weight_group.remote() for w in workers])
    second = join_all()
    assert second != first
    broadcast_and_check(version=5, seed=3)

    _get([sender.leave.remote()] + [w.leave_weight_group.remote() for w in workers])
    for actor in [sender, *workers]:
        ray.kill(actor)


def test_receive_without_group_is_a_clear_error(policy_dir: Path):
    worker = RolloutWorker(RolloutSettings(policy=str(policy_dir), torch_threads=1))
    with pytest.raises(RuntimeError, match="join_weight_group first"):
        worker.receive_weights()
    with pytest.raises(ValueError, match="nccl"):
        worker.join_weight_group("tcp://127.0.0.1:1", 1, 2, "nccl", 1.0)
    worker.leave_weight_group()  # no group: a no-op


def test_failed_join_leaves_no_state_behind():
    """A join that times out must not leave torch's group counter bumped: the next group's store
    keys would then differ from a fresh peer's and every rebuild would time out."""
    import torch.distributed as dist

    with pytest.raises(RuntimeError, match="could not join"):
        collective.WeightGroup(collective.local_init_method("127.0.0.1"), 0, 2, "gloo", timeout_s=1.0)
    assert not dist.is_initialized()
    assert dist.distributed_c10d._world.group_count == 0
    # A one-rank group here works, and two groups in one process at once are refused.
    group = collective.WeightGroup(collective.local_init_method(), 0, 1, "gloo", timeout_s=10.0)
    try:
        collective.send(group, 1, [torch.ones(3)])
        with pytest.raises(RuntimeError, match="one WeightGroup at a time"):
            collective.WeightGroup(collective.local_init_method(), 0, 1, "gloo", timeout_s=10.0)
    finally:
        group.destroy()
    assert not dist.is_initialized() and not group.alive
    with pytest.raises(RuntimeError, match="destroyed"):
        collective.send(group, 2, [torch.ones(3)])
