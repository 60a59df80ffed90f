"""The PPO math with hand-computed numbers (no models, no Ray)."""
from __future__ import annotations

import math

import pytest
import torch

from learner.core import ppo


def test_masked_mean_var_whiten_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    assert ppo.masked_mean(x, m).item() == pytest.approx(2.5)
    # values 1,2,3,4: mean 2.5, squared deviations sum 5, unbiased var 5/3
    assert ppo.masked_var(x, m).item() == pytest.approx(5 / 3)
    w = ppo.masked_whiten(x, m)
    expect = [(v - 2.5) / math.sqrt(5 / 3 + 1e-8) for v in (1, 2, 3, 4)]
    assert w[m.bool()].tolist() == pytest.approx(expect, rel=1e-6)


def test_masked_var_needs_two_entries():
    with pytest.raises(ValueError):
        ppo.masked_var(torch.ones(1, 3), torch.tensor([[0.0, 1.0, 0.0]]))


def test_response_mask_from_lengths():
    # query 2 + response 3 right padded to width 6 (5 next-token positions);
    # query 1 + response 1 left padded by 3.
    m = ppo.response_mask([2, 1], [3, 1], [0, 3], 5)
    assert m.tolist() == [[0, 1, 1, 1, 0], [0, 0, 0, 1, 0]]


def test_kl_rewards_score_on_last_response_token():
    logp = torch.tensor([[-1.0, -2.0, -3.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0, 0.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0]])
    rewards, non_score = ppo.kl_rewards(logp, ref, torch.tensor([5.0]), mask, beta=0.1)
    # kl = logp - ref = [0.5, -1, -1, 0]; non-score reward = -0.1 * kl
    assert non_score[0].tolist() == pytest.approx([-0.05, 0.1, 0.1, 0.0])
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 5.1, 0.0])


def _gae_loop(values, rewards, gamma, lam):
    """GAE for one sequence, written as the plain textbook loop."""
    adv = [0.0] * len(values)
    last = 0.0
    for t in reversed(range(len(values))):
        nxt = values[t + 1] if t + 1 < len(values) else 0.0
        delta = rewards[t] + gamma * nxt - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv


def test_gae_matches_plain_loop_and_hand_numbers():
    values = torch.tensor([[9.0, 0.5, 1.0, 2.0, 7.0]])
    rewards = torch.tensor([[3.0, 0.0, 1.0, 3.0, 4.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    gamma, lam = 0.9, 0.5
    v, adv, ret = ppo.gae_advantages(values, rewards, mask, gamma, lam)
    # masked: V = [0, .5, 1, 2, 0], r = [0, 0, 1, 3, 0]
    raw = _gae_loop([0, 0.5, 1, 2, 0], [0, 0, 1, 3, 0], gamma, lam)
    # by hand at the last response token: delta = 3 + 0.9*0 - 2 = 1
    assert raw[3] == pytest.approx(1.0)
    # t=2: delta = 1 + 0.9*2 - 1 = 1.8; A = 1.8 + 0.45*1 = 2.25
    assert raw[2] == pytest.approx(2.25)
    assert ret[0].tolist() == pytest.approx([a + b for a, b in zip(raw, [0, 0.5, 1, 2, 0])])
    assert v[0].tolist() == pytest.approx([0, 0.5, 1, 2, 0])
    sel = [raw[1], raw[2], raw[3]]
    mean = sum(sel) / 3
    var = sum((x - mean) ** 2 for x in sel) / 2
    assert adv[0, 1:4].tolist() == pytest.approx([(x - mean) / math.sqrt(var + 1e-8) for x in sel], rel=1e-5)


def test_ppo_loss_clipping_by_hand():
    # one token with A=1 and ratio e^0.5 = 1.65 > 1.2: the clipped term wins for A>0
    # (two identical response tokens: the masked variance statistics need two)
    lp_old = torch.tensor([[0.0, -1.0, -1.0]])
    lp_new = torch.tensor([[0.0, -0.5, -0.5]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    adv = torch.tensor([[0.0, 1.0, 1.0]])
    v_old = torch.tensor([[0.0, 1.0, 1.0]])
    v_new = torch.tensor([[0.0, 2.0, 2.0]])  # clipped to 1.2
    ret = torch.tensor([[0.0, 3.0, 3.0]])
    entropy = torch.full((1, 3), math.log(4))  # uniform over 4 choices
    out = ppo.ppo_loss(lp_new, lp_old, v_new, v_old, adv, ret, mask, entropy, cliprange=0.2,
                       cliprange_value=0.2, vf_coef=0.1, ratio_threshold=10.0)
    s = out.stats
    assert s["loss/policy"].item() == pytest.approx(-1.2)  # max(-1.6487, -1.2)
    assert s["policy/clipfrac"].item() == 1.0
    # value: (2-3)^2 = 1 vs (1.2-3)^2 = 3.24 -> 0.5 * 3.24
    assert s["loss/value"].item() == pytest.approx(1.62)
    assert s["val/clipfrac"].item() == 1.0
    assert out.loss.item() == pytest.approx(-1.2 + 0.1 * 1.62)
    assert s["policy/approxkl"].item() == pytest.approx(0.5 * 0.25)
    assert s["policy/policykl"].item() == pytest.approx(-0.5)
    assert s["policy/entropy"].item() == pytest.approx(math.log(4))  # uniform over 4
    assert not out.skipped


def test_ppo_loss_negative_advantage_and_ratio_threshold():
    lp_old = torch.tensor([[-1.0, -1.0]])
    lp_new = torch.tensor([[-1.0 + math.log(0.5), -1.0 + math.log(20.0)]])  # ratios 0.5 and 20
    mask = torch.ones(1, 2)
    adv = torch.tensor([[-1.0, -1.0]])
    z = torch.zeros(1, 2)
    out = ppo.ppo_loss(lp_new, lp_old, z, z, adv, z + 0.5, mask, torch.zeros(1, 2), 0.2, 0.2, 0.1,
                       ratio_threshold=10.0)
    # mean ratio 10.25 > 10: loss and reported losses are zero, but clip stats remain
    assert out.skipped
    assert out.loss.item() == 0.0 and out.stats["loss/policy"].item() == 0.0
    # A=-1: losses max(r, clip(r)) -> token1 max(0.5, 0.8) = 0.8 (clipped), token2 max(20, 1.2) = 20
    assert out.stats["policy/clipfrac"].item() == pytest.approx(0.5)


def test_adaptive_kl_controller_by_hand():
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(3.0, n_steps=128)  # error = clip(0.5 - 1) = -0.2 -> beta *= 1 - 0.2*128/10000
    assert ctl.value == pytest.approx(0.2 * (1 - 0.00256))
    ctl = ppo.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(6.6, n_steps=100)  # error = 0.1 -> beta *= 1.001
    assert ctl.value == pytest.approx(0.2 * 1.001)
    fixed = ppo.FixedKLController(0.3)
    fixed.update(100.0, 128)
    assert fixed.value == 0.3

