"""The PPO learner: the reference step on a batch of (queries, responses, scores).

``PPOLearner`` holds the policy with its value head, the frozen reference, Adam and the KL
controller, and does one job: the forward passes and the step of docs/ppo-step.md, returning
the reference's statistics under the reference's names (plus ``env/*`` and ``time/*``). The
learner actor (``learner.core.actor``) adds what a run needs around it: the process group of
its ranks, the weights for rollout actors, checkpoints and the exported policy.

Data parallelism is torch's: once the actor has joined the ranks' process group
(``join_group``), the with-grad policy pass is wrapped in ``DistributedDataParallel``. Every
rank runs every step on its own contiguous slice of each minibatch's rows (``group.RankGroup``);
each slice's loss is its share of the whole minibatch's (``ppo.ppo_objective`` with the whole
minibatch's token count) times the world size, so DDP's gradient average is the whole
minibatch's gradient: the step the reference takes, up to the order of float sums. The no-grad
passes and the statistics are gathered from every rank's rows, so rewards, advantages and the
statistics are the whole batch's, computed by the same functions as with one rank.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from learner.config import PPOConfig
from learner.core import ppo
from learner.core.forward import PaddedBatch, RowOrder, TokenOutputs, forward, minibatches, pad_batch, scatter
from learner.core.group import RankGroup, data_parallel
from learner.core.models import (PolicyWithValueHead, add_lora, enable_gradient_checkpointing, load_policy,
                                 load_tokenizer)

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


def _check_batch(queries: list[list[int]], responses: list[list[int]], scores: list[float], n: int) -> None:
    if not len(queries) == len(responses) == len(scores) == n:
        raise ValueError(f"step needs ppo.batch_size={n} rollouts, got {len(queries)} queries, "
                         f"{len(responses)} responses, {len(scores)} scores")
    if any(len(r) == 0 for r in responses) or any(len(q) == 0 for q in queries):
        raise ValueError("every query and response needs at least one token")


def _check_finite(what: str, tensor: torch.Tensor, intact: bool) -> None:
    if not torch.isfinite(tensor).all():
        raise NonFiniteError(f"non-finite {what}", intact)


class PolicyPass(nn.Module):
    """The policy's with-grad forward (log-probs, values, entropies) as one module call, so
    ``DistributedDataParallel`` can wrap it and synchronise the gradients it produces."""

    def __init__(self, model: PolicyWithValueHead, cfg: PPOConfig, device: torch.device) -> None:
        super().__init__()
        self.model, self.cfg, self.device = model, cfg, device

    def forward(self, batch: PaddedBatch, with_entropy: bool) -> tuple:
        out = forward(self.model.pretrained_model, batch, self.device, self.cfg.length_buckets, self.cfg.bf16,
                      self.model.v_head, with_entropy)
        return out.logp, out.values, out.entropy


class PPOLearner:
    """The policy + value head, the frozen reference, Adam and the KL controller, and the step."""

    def __init__(self, policy: str, ppo_cfg: PPOConfig, seed: int = 0, device: torch.device | str = "cpu",
                 row_order: RowOrder | None = None) -> None:
        torch.manual_seed(seed)
        self.cfg, self.device = ppo_cfg, torch.device(device)
        self.tokenizer = load_tokenizer(policy)
        lora = ppo_cfg.lora_rank > 0
        # With LoRA the reference is the policy with its adapters switched off, not a second copy.
        self.model, self.ref_model = load_policy(policy, seed, str(self.device), reference=not lora)
        self.peft = (add_lora(self.model.pretrained_model, ppo_cfg.lora_rank, ppo_cfg.lora_alpha,
                              ppo_cfg.lora_target_modules) if lora else None)
        self.model.eval()
        if ppo_cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model.pretrained_model)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad],
                                          lr=ppo_cfg.learning_rate)
        self.kl_ctl = (ppo.AdaptiveKLController(ppo_cfg.init_kl_coef, ppo_cfg.target, ppo_cfg.horizon)
                       if ppo_cfg.adap_kl_ctrl else ppo.FixedKLController(ppo_cfg.init_kl_coef))
        self.rng = np.random.default_rng(seed)
        self.row_order: RowOrder = row_order or self.rng.permutation  # checkpoints save self.rng's state
        self.version = 0  # bumped after every step's updates; rollouts report which they used
        self.pad_id = self.tokenizer.eos_token_id
        self.group = RankGroup()
        self.train_pass: nn.Module = PolicyPass(self.model, ppo_cfg, self.device)

    def join_group(self) -> None:
        """This learner becomes one rank of the default process group (the caller has
        initialised it): DDP wraps the with-grad pass and starts every rank from rank 0's weights."""
        self.group = RankGroup.joined()
        self.train_pass = data_parallel(self.train_pass)

    # ------------------------------------------------------------------ forward passes

    def policy_outputs(self, batch: PaddedBatch) -> TokenOutputs:
        """The current policy's per-token log-probs, values and entropies on ``batch`` (no grad):
        the numbers the step computes, for checks from outside."""
        with torch.no_grad():
            return self._policy_forward(batch, with_entropy=True)

    def _policy_forward(self, batch: PaddedBatch, with_entropy: bool) -> TokenOutputs:
        """Without DDP: for the no-grad passes, which synchronise nothing."""
        return forward(self.model.pretrained_model, batch, self.device, self.cfg.length_buckets, self.cfg.bf16,
                       self.model.v_head, with_entropy)

    def _train_forward(self, batch: PaddedBatch) -> TokenOutputs:
        """With grad, through DDP when there are several ranks."""
        return TokenOutputs(*self.train_pass(batch, True))

    def _reference_logp(self, batch: PaddedBatch) -> torch.Tensor:
        """The frozen reference's log-probs: its own copy, or (LoRA) the policy without adapters."""
        lm, off = ((self.ref_model, contextlib.nullcontext()) if self.peft is None
                   else (self.model.pretrained_model, self.peft.disable_adapter()))
        with torch.no_grad(), off:
            return forward(lm, batch, self.device, self.cfg.length_buckets, self.cfg.bf16).logp

    def _orders(self) -> torch.Tensor:
        """(ppo_epochs, B) row orders, rank 0's on every rank."""
        n = self.cfg.batch_size
        orders = np.asarray([self.row_order(n) for _ in range(self.cfg.ppo_epochs)]).reshape(-1, n)
        return self.group.same_on_every_rank(torch.tensor(orders, dtype=torch.long), self.device)

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
        _check_batch(queries, responses, scores, self.cfg.batch_size)
        t0 = time.perf_counter()
        scores_t = torch.tensor(scores, dtype=torch.float32)
        _check_finite("reward scores", scores_t, intact=True)
        batch = pad_batch(queries, responses, self.pad_id)
        cfg = self.cfg
        epochs = [mb for order in self._orders() for mb in minibatches(order, cfg.mini_batch_size)]
        old = self._rollout_values(batch, behaviour_logprobs, epochs[0])
        beta = float(self.kl_ctl.value)
        # 3. per-token rewards;  4. GAE + whitening
        rewards, non_score = ppo.kl_rewards(old.logp, old.ref_logp, scores_t.to(self.device), old.mask, beta)
        values, advantages, returns = ppo.gae_advantages(old.values, rewards, old.mask, cfg.gamma, cfg.lam)
        t1 = time.perf_counter()
        # 5. epochs of minibatch updates; only the very first minibatch runs at the rollout
        # weights, so only it may reuse the rollout pass (Adam has stepped before every later one)
        mb_stats: list[dict[str, torch.Tensor]] = []
        for k, idx in enumerate(epochs):
            mb_stats.append(self._train_minibatch(batch, idx, old, values, advantages, returns,
                                                  reused=old.reusable if k == 0 else None, intact=k == 0))
        self.version += 1
        t2 = time.perf_counter()
        # statistics, then 6. the KL controller update with this step's rollout KL
        stats = ppo.step_statistics(queries, responses, scores_t, old.logp.cpu(), old.ref_logp.cpu(),
                                    non_score.cpu(), old.mask.cpu(), beta, mb_stats)
        stats["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size)
        return {**stats, "time/learner/forward": t1 - t0, "time/learner/update": t2 - t1}

    def _reuses_rollout_pass(self) -> bool:
        """With one minibatch per epoch (the recipe) the first minibatch is the whole batch under
        the rollout weights, so the reference computes the same forward pass twice; here it runs
        once, with grad, and serves both. Not with micro-batches: the with-grad pass over a whole
        share is what they avoid."""
        cfg = self.cfg
        one_part = not cfg.micro_batch_size or cfg.micro_batch_size >= -(-cfg.mini_batch_size // self.group.world)
        return cfg.mini_batch_size == cfg.batch_size and one_part

    def _rollout_values(self, batch: PaddedBatch, behaviour_logprobs: list[list[float]] | None,
                        first: torch.Tensor) -> "_Old":
        """Steps 1-2 (eval mode: dropout off): reference log-probs, old log-probs and values.

        Each rank runs the passes on its share of the rows (of the first minibatch's order, when
        that minibatch reuses the with-grad pass: its rows are then this rank's rows there);
        the no-grad results are gathered into whole-batch tensors."""
        n, mask = self.cfg.batch_size, batch.mask.to(self.device)
        reuse = self._reuses_rollout_pass()
        rows = first if reuse else torch.arange(n)
        own = batch.rows(self.group.own(rows))
        reusable = None
        if reuse:
            reusable = self._train_forward(own)
            old = reusable.detach()
        else:
            with torch.no_grad():
                old = self._policy_forward(own, with_entropy=False)

        def whole(part: torch.Tensor) -> torch.Tensor:
            out = torch.empty((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
            out[rows.to(part.device)] = self.group.gather(part, rows)
            return out

        logp_ref, logp_old, v_old = whole(self._reference_logp(own)), whole(old.logp), whole(old.values)
        if behaviour_logprobs is not None:
            flat = torch.tensor([lp for row in behaviour_logprobs for lp in row], device=self.device)
            logp_old = scatter(flat, mask.bool(), 0, mask.shape[1])
        for what, t in (("policy log-probs", logp_old), ("values", v_old), ("reference log-probs", logp_ref)):
            _check_finite(what, t[mask.bool()], intact=True)
        return _Old(logp_old, v_old, logp_ref, mask, reusable)

    def _train_minibatch(self, batch: PaddedBatch, idx: torch.Tensor, old: "_Old", values: torch.Tensor,
                         advantages: torch.Tensor, returns: torch.Tensor, reused: TokenOutputs | None,
                         intact: bool) -> dict[str, torch.Tensor]:
        """One gradient step on the minibatch ``idx``: this rank's share of its rows, in
        micro-batches whose gradients accumulate (DDP synchronises after the last), then the
        whole minibatch's statistics, the finiteness checks and Adam's step."""
        cfg, group = self.cfg, self.group
        n_tokens = old.mask[idx].sum()  # the whole minibatch's, on every rank
        parts = [group.own(idx)] if reused is not None else self._micro_batches(group.own(idx))
        self.optimizer.zero_grad(set_to_none=False)
        outputs = []
        for j, rows in enumerate(parts):
            last = j == len(parts) - 1
            with contextlib.nullcontext() if last or group.world == 1 else self.train_pass.no_sync():
                out = reused if reused is not None else self._train_forward(batch.rows(rows))
                obj = ppo.ppo_objective(out.logp, old.logp[rows], out.values, values[rows], advantages[rows],
                                        returns[rows], old.mask[rows], cfg.cliprange, cfg.cliprange_value,
                                        cfg.vf_coef, n_tokens=n_tokens)
                (obj.loss * group.world).backward()  # DDP averages over ranks: the sum is the whole's
            outputs.append(out.detach())
        new = {name: group.gather(torch.cat([getattr(o, name) for o in outputs]), idx)
               for name in ("logp", "values", "entropy")}
        with torch.no_grad():  # the statistics, and the ratio check, of the whole minibatch
            loss = ppo.ppo_loss(new["logp"], old.logp[idx], new["values"], values[idx], advantages[idx],
                                returns[idx], old.mask[idx], new["entropy"], cfg.cliprange, cfg.cliprange_value,
                                cfg.vf_coef, cfg.ratio_threshold)
        _check_finite("PPO loss", loss.stats["loss/total"], intact)  # never step on NaN
        if loss.skipped:
            # The reference zeroes the loss, so its gradient is zero; Adam still steps.
            log.warning("mean PPO ratio above ppo.ratio_threshold=%s: minibatch loss zeroed", cfg.ratio_threshold)
            for p in self.model.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        _check_finite_grads(self.model, intact)
        self.optimizer.step()
        return {k: v.detach().cpu() for k, v in loss.stats.items()}

    def _micro_batches(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """This rank's share of a minibatch in ``ppo.micro_batch_size`` pieces (one when 0)."""
        return list(rows.split(self.cfg.micro_batch_size)) if self.cfg.micro_batch_size else [rows]


@dataclass
class _Old:
    """The batch at the rollout weights: old log-probs and values, reference log-probs, the
    response mask (all (B, T)), and the outputs the first minibatch may reuse."""

    logp: torch.Tensor
    values: torch.Tensor
    ref_logp: torch.Tensor
    mask: torch.Tensor
    reusable: TokenOutputs | None  # with grad: this rank's share of the first minibatch, in its order
