"""Weight broadcast through the object store: every rollout actor holds the learner's
weights afterwards, and generation reports (and used) the version it holds."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actors.rollout import RolloutSettings, RolloutWorker
from learner.config import PPOConfig
from learner.core.actor import LearnerActor
from learner.core.forward import pad_batch


def test_broadcast_then_generate_with_reported_version(ray_local, policy_dir: Path):
    ray = ray_local
    cfg = PPOConfig(batch_size=8, mini_batch_size=8, ppo_epochs=1, learning_rate=1e-3)
    learner = ray.remote(LearnerActor).options(num_cpus=0).remote(str(policy_dir), cfg, seed=0, torch_threads=1)
    settings = RolloutSettings(policy=str(policy_dir), seed=0, torch_threads=1)
    workers = [ray.remote(RolloutWorker).options(num_cpus=0).remote(settings) for _ in range(2)]

    # One PPO update so the learner's weights differ from what the workers loaded from disk.
    queries = [[10 + i, 20 + i, 30] for i in range(8)]
    responses = [[40 + i, 50, 60, 70] for i in range(8)]
    ray.get(learner.step.remote(queries, responses, [float(i % 3) for i in range(8)]), timeout=120)

    version_ref, weights_ref = learner.weights.options(num_returns=2).remote()
    version = ray.get(version_ref, timeout=120)
    assert version == 1
    assert ray.get([w.load_weights.remote(weights_ref, version) for w in workers], timeout=120) == [1, 1]

    learner_w = ray.get(weights_ref, timeout=120)
    for got in ray.get([w.get_weights.remote() for w in workers], timeout=120):
        assert set(learner_w) <= set(got)
        for name, value in learner_w.items():
            np.testing.assert_array_equal(got[name], value, err_msg=name)

    # Generation reports version 1, and its log-probs are those of the version-1 policy:
    # score the sampled tokens with the learner's model and with the initial one.
    rollout = ray.get(workers[0].generate.remote(queries[:4], 0, 0), timeout=120)
    assert rollout.weight_version == 1
    local = LearnerActor(str(policy_dir), cfg, device="cpu")  # version 0 weights
    before = _logprobs(local, rollout.queries, rollout.responses)
    local.learner.model.pretrained_model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in learner_w.items()},
                                                 strict=False)
    after = _logprobs(local, rollout.queries, rollout.responses)
    behaviour = torch.tensor([lp for row in rollout.logprobs for lp in row])
    assert torch.allclose(after, behaviour, atol=1e-4)
    assert not torch.allclose(before, behaviour, atol=1e-3)


def _logprobs(learner: LearnerActor, queries: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    batch = pad_batch(queries, responses, learner.pad_id)
    return learner.policy_outputs(batch).logp[batch.mask.bool()]
