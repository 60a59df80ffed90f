"""The PPO math of the reference step, as small pure-torch functions.

Each function mirrors one numbered step of docs/ppo-step.md, which is the legacy TRL
``PPOTrainer.step`` (trl 0.7.11 .. 0.11.4, ``trl/trainer/ppo_trainer.py``). No Ray, no models: tensors in,
tensors out, so every piece is tested with hand-computed numbers (tests/test_ppo_math.py).

Shapes: B sequences, T = padded length - 1 (positions that predict a next token),
V vocabulary size. ``mask`` is (B, T) float, 1 where the next token is a response token.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Token-level mean over the whole tensor: sum(x*m) / sum(m)."""
    return (values * mask).sum() / mask.sum()


def masked_var(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased masked variance (Bessel's n/(n-1) with n = sum(mask)), as TRL's masked_var."""
    n = mask.sum()
    if n <= 1:
        raise ValueError("masked_var needs at least two masked entries (a batch with one response token?)")
    mean = masked_mean(values, mask)
    return masked_mean((values - mean) ** 2, mask) * (n / (n - 1))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(x - mean) * rsqrt(var + 1e-8) with masked mean and unbiased masked variance."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    return (values - mean) * torch.rsqrt(var + 1e-8)


def response_mask(query_lens: list[int], response_lens: list[int], offsets: list[int], width: int) -> torch.Tensor:
    """Step 2: mask[b, t] = 1 for t in [off + Lq - 1, off + Lq - 1 + Lr), (B, width).

    Built from lengths, never from ``ids != pad``: the pad id is EOS, and EOS can be a real
    query or response token. ``offsets`` is the left padding of each row (0 when right padded).
    """
    mask = torch.zeros(len(query_lens), width)
    for b, (lq, lr, off) in enumerate(zip(query_lens, response_lens, offsets)):
        start = off + lq - 1
        mask[b, start:start + lr] = 1.0
    return mask


def kl_rewards(logp_old: torch.Tensor, logp_ref: torch.Tensor, scores: torch.Tensor,
               mask: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: per-token reward = -beta * kl, plus the score on the last response token.

    kl = logp_old - logp_ref (the reference's ``kl`` penalty, the only one defined).
    Returns (rewards, non_score_rewards = -beta * kl), each (B, T).
    """
    non_score = -beta * (logp_old - logp_ref)
    rewards = non_score.clone()
    last = mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)  # (B,) index of the last masked entry
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def gae_advantages(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor,
                   gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step 4: GAE once for the batch, then whiten over masked tokens.

    delta[t] = r[t] + gamma * V[t+1] - V[t] (V past the end = 0),
    A[t] = delta[t] + gamma * lam * A[t+1]  (Schulman et al. 2016, arXiv:1506.02438).
    Values and rewards are zeroed outside the mask first, as in TRL. Returns
    (masked values, whitened advantages, returns = A + V before whitening), each (B, T).
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    lastgaelam = torch.zeros_like(rewards[:, 0])
    reversed_adv = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = advantages + values
    return values, masked_whiten(advantages, mask).detach(), returns


@dataclass(frozen=True)
class LossOutput:
    """The minibatch loss and its statistics (detached scalars), names as in the reference."""

    loss: torch.Tensor  # scalar with grad: pg_loss + vf_coef * vf_loss (zeroed on a ratio spike)
    stats: dict[str, torch.Tensor]
    skipped: bool  # the mean ratio exceeded ratio_threshold, so the loss was zeroed


@dataclass(frozen=True)
class Objective:
    """The clipped losses of step 5 on some rows: the scalar to differentiate and its parts."""

    loss: torch.Tensor     # pg_loss + vf_coef * vf_loss, with grad
    pg_loss: torch.Tensor
    vf_loss: torch.Tensor
    ratio: torch.Tensor      # (B, T) exp(logp_new - logp_old)
    pg_clipped: torch.Tensor  # (B, T) bool: the clipped policy term won
    vf_clipped: torch.Tensor  # (B, T) bool: the clipped value term won


def ppo_objective(logp_new: torch.Tensor, logp_old: torch.Tensor, v_new: torch.Tensor, v_old: torch.Tensor,
                  advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange: float,
                  cliprange_value: float, vf_coef: float, n_tokens: torch.Tensor | None = None) -> Objective:
    """Step 5's clipped surrogate + clipped value loss (Schulman et al. 2017, arXiv:1707.06347).

    pg_loss = sum(max(-A*r, -A*clip(r, 1-eps, 1+eps)) * m) / n
    vf_loss = 0.5 * sum(max((V-R)^2, (clip(V, V_old-eps_v, V_old+eps_v)-R)^2) * m) / n
    n = ``n_tokens``, by default mask.sum() (each is then a masked mean). A caller that splits a
    minibatch into parts passes the whole minibatch's count with each part: the parts' losses,
    and so their gradients, then add up to the whole minibatch's.
    """
    n = mask.sum() if n_tokens is None else n_tokens
    v_clipped = torch.clamp(v_new, v_old - cliprange_value, v_old + cliprange_value)
    vf_losses1 = (v_new - returns) ** 2
    vf_losses2 = (v_clipped - returns) ** 2
    vf_loss = 0.5 * (torch.max(vf_losses1, vf_losses2) * mask).sum() / n

    ratio = torch.exp(logp_new - logp_old)
    pg_losses = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = (torch.max(pg_losses, pg_losses2) * mask).sum() / n
    return Objective(pg_loss + vf_coef * vf_loss, pg_loss, vf_loss, ratio, torch.gt(pg_losses2, pg_losses),
                     torch.gt(vf_losses2, vf_losses1))


def ppo_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, v_new: torch.Tensor, v_old: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, entropy: torch.Tensor,
             cliprange: float, cliprange_value: float, vf_coef: float, ratio_threshold: float) -> LossOutput:
    """Step 5 on a whole minibatch: ``ppo_objective`` with masked means, and its statistics.

    If masked_mean(ratio) > ratio_threshold the loss (and the reported losses) become 0,
    but the caller still runs backward and the optimizer step, as the reference does.
    ``entropy`` is the current policy's per-token entropy (B, T); it only feeds a statistic.
    """
    obj = ppo_objective(logp_new, logp_old, v_new, v_old, advantages, returns, mask, cliprange, cliprange_value,
                        vf_coef)
    loss = obj.loss
    with torch.no_grad():
        stats = {"loss/policy": obj.pg_loss.detach(), "loss/value": obj.vf_loss.detach(),
                 "loss/total": loss.detach()}
        for key, x in {"policy/entropy": entropy, "policy/approxkl": 0.5 * (logp_new - logp_old) ** 2,
                       "policy/policykl": logp_old - logp_new, "policy/clipfrac": obj.pg_clipped.float(),
                       "policy/ratio_mean": obj.ratio, "policy/advantages_mean": advantages,
                       "returns/mean": returns, "val/vpred": v_new, "val/error": (v_new - returns) ** 2,
                       "val/clipfrac": obj.vf_clipped.float(), "val/mean": v_old}.items():
            stats[key] = masked_mean(x, mask)
        stats["returns/var"] = masked_var(returns, mask)
        stats["val/var"] = masked_var(v_old, mask)

    skipped = stats["policy/ratio_mean"].item() > ratio_threshold
    if skipped:
        # The reference skips the update by zeroing the loss; Adam still steps (its moments move).
        loss = loss * 0.0
        for key in ("loss/policy", "loss/value", "loss/total"):
            stats[key] = stats[key] * 0.0
    return LossOutput(loss=loss, stats=stats, skipped=skipped)


def step_statistics(queries: list[list[int]], responses: list[list[int]], scores: torch.Tensor,
                    logp_old: torch.Tensor, logp_ref: torch.Tensor, non_score: torch.Tensor, mask: torch.Tensor,
                    beta: float, minibatch_stats: list[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The step's statistics under the reference's names: the rollout's KL and entropy, the
    scores, the lengths, and each minibatch's loss statistics averaged over minibatches."""
    q_lens = torch.tensor([len(q) for q in queries], dtype=torch.float32)
    r_lens = torch.tensor([len(r) for r in responses], dtype=torch.float32)
    stats = {
        "objective/kl": ((logp_old - logp_ref) * mask).sum(dim=1).mean(),
        "objective/kl_coef": torch.tensor(beta),
        "objective/entropy": (-logp_old * mask).sum(dim=1).mean(),
        "ppo/mean_non_score_reward": masked_mean(non_score, mask),
        "ppo/mean_scores": scores.mean(),
        "ppo/std_scores": scores.std(),
        "tokens/queries_len_mean": q_lens.mean(),
        "tokens/queries_len_std": q_lens.std(),
        "tokens/responses_len_mean": r_lens.mean(),
        "tokens/responses_len_std": r_lens.std(),
    }
    for key in minibatch_stats[0]:
        stats[f"ppo/{key}"] = torch.stack([s[key] for s in minibatch_stats]).mean()
    stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
    out = {k: float(v) for k, v in stats.items()}
    out["env/reward_mean"] = float(scores.mean())
    out["env/reward_std"] = float(scores.std())
    return out


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, arXiv:1909.08593, sec. 2.2).

    e = clip(current / target - 1, -0.2, 0.2);  beta *= 1 + e * n_steps / horizon
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float) -> None:
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


class FixedKLController:
    """A KL coefficient that never changes."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current: float, n_steps: int) -> None:
        pass
