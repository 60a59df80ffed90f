"""The PPO learner: the reference step on a batch of (queries, responses, scores).

``PPOLearner`` holds the policy with its value head, the frozen reference, Adam and the KL
controller, and does one job: the forward passes and the step of docs/ppo-step.md, returning
the reference's statistics under the reference's names (plus ``env/*`` and ``time/*``). The
learner actor (``learner.core.actor``) adds what a run needs around it: its ranks, the weights
for rollout actors, checkpoints and the exported policy.
"""
from __future__ import annotations

import functools
import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from learner.config import PPOConfig
from learner.core import ppo
from learner.core.forward import (PaddedBatch, RowOrder, TokenOutputs, forward, minibatches, pad_batch, reuse_first,
                                  scatter)
from learner.core.models import load_policy, load_tokenizer
from learner.core.ranks import Ranks

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """A non-finite value in the step; ``intact`` says no parameter was updated in this step
    (and the RNGs were put back as they were at its start, so the learner's state is the
    state before the step). ``what`` is the one-line message."""

    def __init__(self, what: str, intact: bool) -> None:
        super().__init__(what)
        self.what, self.intact = what, intact

    def __reduce__(self):  # both arguments survive the trip to the driver (Ray pickles errors)
        return type(self), (self.what, self.intact)


def _rng_kept_on_stop(step: Callable) -> Callable:
    """A step stopped before any update leaves the RNGs as they were at its start."""
    @functools.wraps(step)
    def guarded(self: "PPOLearner", *args, **kwargs):
        numpy_rng, torch_rng = self.rng.bit_generator.state, torch.get_rng_state()
        try:
            return step(self, *args, **kwargs)
        except NonFiniteError as err:
            if err.intact:
                self.rng.bit_generator.state = numpy_rng
                torch.set_rng_state(torch_rng)
            raise
    return guarded


def _check_finite_grads(model: torch.nn.Module, intact: bool) -> None:
    """Before the optimizer step: a non-finite gradient must never reach the weights or Adam."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
        raise NonFiniteError("non-finite gradient", intact)


def _check_finite(what: str, tensor: torch.Tensor, intact: bool) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"non-finite {what}", intact)


class PPOLearner:
    """The policy + value head, the frozen reference, Adam and the KL controller, and the step."""

    def __init__(self, policy: str, ppo_cfg: PPOConfig, seed: int = 0, device: torch.device | str = "cpu",
                 row_order: RowOrder | None = None, ranks: Ranks | None = None) -> None:
        """``ranks``: this process's place among the learner's data-parallel ranks (one rank
        when None); each rank runs the step on its own rows of every minibatch."""
        torch.manual_seed(seed)
        self.cfg, self.device = ppo_cfg, torch.device(device)
        self.ranks = ranks or Ranks.single()
        self.tokenizer = load_tokenizer(policy)
        self.model, self.ref_model = load_policy(policy, seed, str(self.device))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ppo_cfg.learning_rate)
        self.kl_ctl = (ppo.AdaptiveKLController(ppo_cfg.init_kl_coef, ppo_cfg.target, ppo_cfg.horizon)
                       if ppo_cfg.adap_kl_ctrl else ppo.FixedKLController(ppo_cfg.init_kl_coef))
        self.rng = np.random.default_rng(seed)
        self.row_order: RowOrder = row_order or self.rng.permutation  # checkpoints save self.rng's state
        self.version = 0  # bumped after every step's updates; rollouts report which they used
        self.pad_id = self.tokenizer.eos_token_id
        if self.ranks.world > 1:  # every rank starts from rank 0's weights (they load the same files; make sure)
            flat = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
            torch.nn.utils.vector_to_parameters(self.ranks.broadcast_(flat), self.model.parameters())

    # ------------------------------------------------------------------ forward passes

    def policy_outputs(self, batch: PaddedBatch) -> TokenOutputs:
        """The current policy's per-token log-probs, values and entropies on ``batch`` (no grad):
        the numbers the step computes, for checks from outside."""
        with torch.no_grad():
            return self._policy_forward(batch, with_entropy=True)

    def _policy_forward(self, batch: PaddedBatch, with_entropy: bool) -> TokenOutputs:
        return forward(self.model.pretrained_model, batch, self.device, self.cfg.length_buckets, self.cfg.bf16,
                       self.model.v_head, with_entropy)

    def _reference_logp(self, batch: PaddedBatch) -> torch.Tensor:
        with torch.no_grad():
            return forward(self.ref_model, batch, self.device, self.cfg.length_buckets, self.cfg.bf16).logp

    def _rollout_pass(self, batch: PaddedBatch) -> tuple[TokenOutputs, TokenOutputs | None]:
        """Old log-probs and values (detached) at the rollout weights, and the with-grad outputs
        the first minibatch may reuse (see ``reuse_first``), or None.

        With one minibatch per epoch (the recipe) the first minibatch is the whole batch under
        these same weights, so the reference computes the same forward pass twice; here it runs
        once, with grad, and serves both. Otherwise the pass runs without grad.
        """
        if self.cfg.mini_batch_size == self.cfg.batch_size:
            out = self._policy_forward(batch, with_entropy=True)
            return TokenOutputs(out.logp.detach(), out.values.detach(), None), out
        with torch.no_grad():
            return self._policy_forward(batch, with_entropy=False), None

    # ------------------------------------------------------------------ the PPO step

    @_rng_kept_on_stop
    def step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
             behaviour_logprobs: list[list[float]] | None = None) -> dict[str, float]:
        """One reference PPO step on a full batch; returns the reference's statistics.

        ``behaviour_logprobs`` (B, Lr_i), when given, are the log-probs of the policy that
        sampled the responses and serve as the old log-probs: with generation overlapped with
        the previous update (ppo.max_lag=1) that policy is one update behind the learner,
        and the PPO ratio must be taken against it.
        """
        self._check_batch(queries, responses, scores)
        t0 = time.perf_counter()
        scores_t = torch.tensor(scores, dtype=torch.float32)
        _check_finite("reward scores", scores_t, intact=True)
        batch = pad_batch(queries, responses, self.pad_id)
        old = self._rollout_values(batch, behaviour_logprobs)
        beta = float(self.kl_ctl.value)
        # 3. per-token rewards;  4. GAE + whitening
        rewards, non_score = ppo.kl_rewards(old.logp, old.ref_logp, scores_t.to(self.device), old.mask, beta)
        values, advantages, returns = ppo.gae_advantages(old.values, rewards, old.mask, self.cfg.gamma, self.cfg.lam)
        t1 = time.perf_counter()
        # 5. epochs of minibatch updates
        mb_stats = self._epochs(batch, old, values, advantages, returns)
        self.version += 1
        t2 = time.perf_counter()
        # statistics, then 6. the KL controller update with this step's rollout KL
        stats = ppo.step_statistics(queries, responses, scores_t, old.logp.cpu(), old.ref_logp.cpu(),
                                    non_score.cpu(), old.mask.cpu(), beta, mb_stats)
        stats["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        self.kl_ctl.update(stats["objective/kl"], self.cfg.batch_size)
        return {**stats, "time/learner/forward": t1 - t0, "time/learner/update": t2 - t1}

    def _check_batch(self, queries: list[list[int]], responses: list[list[int]], scores: list[float]) -> None:
        n = self.cfg.batch_size
        if not len(queries) == len(responses) == len(scores) == n:
            raise ValueError(f"step needs ppo.batch_size={n} rollouts, got {len(queries)} queries, "
                             f"{len(responses)} responses, {len(scores)} scores")
        if any(len(r) == 0 for r in responses) or any(len(q) == 0 for q in queries):
            raise ValueError("every query and response needs at least one token")

    def _rollout_values(self, batch: PaddedBatch, behaviour_logprobs: list[list[float]] | None) -> "_Old":
        """Steps 1-2 (eval mode: dropout off): reference log-probs, old log-probs and values.

        Each rank runs the passes on its own rows; the no-grad results are summed into
        whole-batch tensors, so rewards, advantages and statistics are the whole batch's."""
        n, ranks = self.cfg.batch_size, self.ranks
        mask = batch.mask.to(self.device)
        lo, hi = ranks.own_rows(n)
        own = batch if ranks.world == 1 else batch.rows(torch.arange(lo, hi))
        logp_ref = ranks.from_rows(self._reference_logp(own), n)
        old, reusable = self._rollout_pass(own)
        logp_old, v_old = ranks.from_rows(old.logp, n), ranks.from_rows(old.values, n)
        if reusable is not None and ranks.world > 1:  # rows placed where the whole batch has them
            reusable = reusable.padded_rows(lo, n)
        if behaviour_logprobs is not None:
            flat = torch.tensor([lp for row in behaviour_logprobs for lp in row], device=self.device)
            logp_old = scatter(flat, mask.bool(), 0, mask.shape[1])
        for what, t in (("policy log-probs", logp_old), ("values", v_old), ("reference log-probs", logp_ref)):
            _check_finite(what, t[mask.bool()], intact=True)
        return _Old(logp_old, v_old, logp_ref, mask, reusable)

    def _epochs(self, batch: PaddedBatch, old: "_Old", values: torch.Tensor, advantages: torch.Tensor,
                returns: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """ppo_epochs passes over the batch in minibatches, rows in the order ``row_order`` gives
        each epoch (rank 0's orders: every rank takes them, and each its own rows of a minibatch)."""
        n, ranks, cfg = self.cfg.batch_size, self.ranks, self.cfg
        lo, hi = ranks.own_rows(n)
        orders = torch.tensor(np.asarray([self.row_order(n) for _ in range(cfg.ppo_epochs)]).reshape(-1, n)
                              if ranks.rank == 0 else np.zeros((cfg.ppo_epochs, n)), dtype=torch.long)
        epochs = (minibatches(order, cfg.mini_batch_size) for order in ranks.broadcast_(orders))
        mb_stats: list[dict[str, torch.Tensor]] = []
        for idx, reused in reuse_first(itertools.chain.from_iterable(epochs), old.reusable):
            n_tokens = old.mask[idx].sum()  # the whole minibatch's, on every rank
            if ranks.world > 1:
                keep = (idx >= lo) & (idx < hi)
                idx, reused = idx[keep], None if reused is None else reused.rows(keep)
            mb_stats.append(self._train_minibatch(batch.rows(idx), old.logp[idx], values[idx], advantages[idx],
                                                  returns[idx], n_tokens, intact=not mb_stats, outputs=reused))
        return mb_stats

    def _train_minibatch(self, mb: PaddedBatch, logp_old: torch.Tensor, v_old: torch.Tensor,
                         advantages: torch.Tensor, returns: torch.Tensor, n_tokens: torch.Tensor, intact: bool,
                         outputs: TokenOutputs | None = None) -> dict[str, torch.Tensor]:
        mask = mb.mask.to(self.device)
        if outputs is None and len(mask) == 0:  # this rank owns no row of the minibatch
            outputs = TokenOutputs(mask.clone(), mask.clone(), mask.clone())
        out_new = outputs or self._policy_forward(mb, with_entropy=True)
        cfg = self.cfg
        out = ppo.ppo_loss(out_new.logp, logp_old, out_new.values, v_old, advantages, returns, mask,
                           out_new.entropy, cfg.cliprange, cfg.cliprange_value, cfg.vf_coef, cfg.ratio_threshold,
                           n_tokens=n_tokens, total=self.ranks.total)
        _check_finite("PPO loss", out.stats["loss/total"], intact)  # before backward: never step on NaN
        if out.skipped:
            log.warning("mean PPO ratio above ppo.ratio_threshold=%s: minibatch loss zeroed", cfg.ratio_threshold)
        self.optimizer.zero_grad(set_to_none=False)
        if out.loss.requires_grad:  # not on a rank with no row here: its gradient is zero
            out.loss.backward()
        self.ranks.sum_grads_(list(self.model.parameters()))
        _check_finite_grads(self.model, intact)
        self.optimizer.step()
        return {k: v.detach().cpu() for k, v in out.stats.items()}


@dataclass
class _Old:
    """The batch at the rollout weights: old log-probs and values, reference log-probs, the
    response mask (all (B, T)), and the outputs the first minibatch may reuse."""

    logp: torch.Tensor
    values: torch.Tensor
    ref_logp: torch.Tensor
    mask: torch.Tensor
    reusable: TokenOutputs | None
