"""The PPO learner: applies the reference step to a batch of (queries, responses, scores).

A plain class; the driver wraps it with ``ray.remote`` so a cluster can place it on a GPU
node. ``step`` follows ``shared/docs/ppo-reference.md`` step by step and returns the
reference's statistics under the reference's names (plus ``env/*`` and ``time/*``).
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from actors import collective
from learner import ppo
from learner.config import PPOConfig
from learner.dataparallel import Ranks
from learner.models import load_policy, load_tokenizer, save_policy
from modelhost.process import process_info, resolve_device
from modelhost.weights import numpy_copies

log = logging.getLogger(__name__)


@dataclass
class PaddedBatch:
    """Query+response rows padded to one length; positions index the padded row."""

    input_ids: torch.Tensor       # (B, L) long
    attention_mask: torch.Tensor  # (B, L) long, 1 on real tokens
    position_ids: torch.Tensor    # (B, L) long, each real token's position in its unpadded row
    mask: torch.Tensor            # (B, L-1) float, 1 where the next token is a response token

    def rows(self, idx: torch.Tensor) -> "PaddedBatch":
        return PaddedBatch(self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx], self.mask[idx])


def pad_batch(queries: list[list[int]], responses: list[list[int]], pad_id: int,
              side: str = "right") -> PaddedBatch:
    """Concatenate each query and response and pad; masks come from lengths, never from pad ids."""
    rows = [q + r for q, r in zip(queries, responses)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    offsets = []
    for b, row in enumerate(rows):
        off = width - len(row) if side == "left" else 0
        ids[b, off:off + len(row)] = torch.tensor(row, dtype=torch.long)
        attn[b, off:off + len(row)] = 1
        offsets.append(off)
    # Position ids count real tokens only, so a left-padded row sees the positions it
    # would see unpadded (GPT-2 has learned absolute positions).
    pos = (attn.cumsum(dim=1) - 1).clamp(min=0)
    mask = ppo.response_mask([len(q) for q in queries], [len(r) for r in responses], offsets, width - 1)
    return PaddedBatch(ids, attn, pos, mask)


@dataclass
class TokenOutputs:
    """Per-token outputs in the batch's (B, T) layout, T = padded length - 1."""

    logp: torch.Tensor                # log-prob of the next token; 0 where it is not a response token
    values: torch.Tensor | None       # value head at each position
    entropy: torch.Tensor | None      # entropy of the next-token distribution; 0 off the mask

    def rows(self, idx: torch.Tensor) -> "TokenOutputs":
        pick = lambda x: None if x is None else x[idx]  # noqa: E731
        return TokenOutputs(self.logp[idx], pick(self.values), pick(self.entropy))

    def padded_rows(self, lo: int, n: int) -> "TokenOutputs":
        """These rows as rows lo.. of n, the others zero (keeping grad)."""
        pad = lambda x: None if x is None else torch.nn.functional.pad(x, (0, 0, lo, n - lo - len(x)))  # noqa: E731
        return TokenOutputs(pad(self.logp), pad(self.values), pad(self.entropy))


RowOrder = Callable[[int], Sequence[int]]
"""Gives one epoch's row order for a batch of n rows. The reference draws
``np.random.permutation(n)`` each epoch; the golden test passes the orders it recorded."""


def minibatches(order: Sequence[int], mini_batch_size: int) -> list[torch.Tensor]:
    """One epoch's minibatches: consecutive slices of ``order``, as the reference takes them."""
    order = torch.as_tensor(np.asarray(order), dtype=torch.long)
    return list(torch.split(order, mini_batch_size))


def reuse_first(batches: Iterable[torch.Tensor], outputs: TokenOutputs | None
                ) -> Iterator[tuple[torch.Tensor, TokenOutputs | None]]:
    """Each minibatch's rows with the outputs it may use instead of its own forward pass.

    ``outputs`` are the rollout pass's with-grad outputs (``_rollout_pass`` keeps them with one
    minibatch per epoch). Only the very first minibatch runs under the rollout weights, so it
    gets their rows; every later one gets None: Adam has stepped since.
    """
    for idx in batches:
        yield idx, None if outputs is None else outputs.rows(idx)
        outputs = None


def _scatter(flat: torch.Tensor, sel: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Values for the True entries of ``sel`` (b, w) into a zero (b, width) tensor whose
    columns start..start+w they fill, keeping grad."""
    out = torch.zeros(sel.shape, dtype=flat.dtype, device=flat.device).masked_scatter(sel, flat)
    return _place(out, start, width)


def _place(x: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(b, w) columns placed at start..start+w of a zero-padded (b, width) tensor."""
    return torch.nn.functional.pad(x, (start, width - start - x.shape[1]))


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
    """Holds the policy + value head, the frozen reference, Adam and the KL controller."""

    def __init__(self, policy: str, ppo_cfg: PPOConfig, seed: int = 0, device: str = "auto",
                 torch_threads: int = 0, row_order: RowOrder | None = None, processes: int = 1,
                 rank_timeout_s: float = 600.0, exit_on_rank_loss: bool = False, ranks: Ranks | None = None) -> None:
        """``processes`` > 1 starts that many data-parallel ranks on this node (learner/dataparallel.py),
        each with ``torch_threads / processes`` threads; ``ranks`` is given to the ranks it starts."""
        self.device = resolve_device(device)
        if processes > 1 and self.device.type != "cpu":
            # The placement gave this learner a GPU (cluster.learner_gpus=-1 fits the cluster): one process.
            log.warning("cluster.learner_processes=%d is for a CPU learner; this one runs on %s, as one process",
                        processes, self.device)
            processes = 1
        if processes > 1:
            torch_threads = max(1, (torch_threads or os.cpu_count() or 1) // processes)
            ranks = Ranks.start(processes, rank_timeout_s, exit_on_rank_loss)
            ranks.send({"policy": policy, "ppo_cfg": ppo_cfg, "seed": seed, "device": "cpu",
                        "torch_threads": torch_threads})
        self.ranks = ranks or Ranks.single()
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        torch.manual_seed(seed)
        self.cfg = ppo_cfg
        self.tokenizer = load_tokenizer(policy)
        self.model, self.ref_model = load_policy(policy, seed, str(self.device))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=ppo_cfg.learning_rate)
        self.kl_ctl = (ppo.AdaptiveKLController(ppo_cfg.init_kl_coef, ppo_cfg.target, ppo_cfg.horizon)
                       if ppo_cfg.adap_kl_ctrl else ppo.FixedKLController(ppo_cfg.init_kl_coef))
        self.rng = np.random.default_rng(seed)
        self.row_order: RowOrder = row_order or self.rng.permutation  # checkpoints save self.rng's state
        self.version = 0  # bumped after every optimizer step sequence; rollouts report which they used
        self.pad_id = self.tokenizer.eos_token_id
        self.padding_side = "right"
        # Every rank starts from rank 0's weights (they load the same files; this makes sure).
        if self.ranks.world > 1:
            flat = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
            torch.nn.utils.vector_to_parameters(self.ranks.broadcast_(flat), self.model.parameters())

    # ------------------------------------------------------------------ data-parallel ranks

    def _tell_ranks(self, method: str, *args) -> None:
        """Rank 0: every other rank runs ``method(*args)`` too (they wait in ``serve``)."""
        if self.ranks.rank == 0 and self.ranks.world > 1:
            self.ranks.send((method, args))

    def serve(self) -> None:
        """Ranks 1..: run what rank 0 sends until it says stop. Errors every rank meets alike
        (a bad batch, a non-finite value) reach the driver from rank 0; this rank goes on."""
        while (command := self.ranks.receive()) is not None:
            method, args = command
            try:
                getattr(self, method)(*args)
            except (ValueError, NonFiniteError) as err:
                log.debug("rank %d: %s failed: %s", self.ranks.rank, method, err)

    def weights_agree(self) -> bool:
        """Whether every rank holds exactly rank 0's weights (for tests and debugging)."""
        self._tell_ranks("_weights_agree")
        return self._weights_agree()

    def _weights_agree(self) -> bool:
        mine = torch.nn.utils.parameters_to_vector(self.model.parameters()).detach()
        differ = float(not torch.equal(mine, self.ranks.broadcast_(mine.clone())))
        return self.ranks.sum_(torch.tensor([differ])).item() == 0

    def close(self) -> None:
        """Stops the learner's other ranks (a one-process learner has nothing to stop)."""
        self.ranks.close()

    # ------------------------------------------------------------------ forward passes

    def policy_outputs(self, batch: PaddedBatch) -> TokenOutputs:
        """The current policy's per-token log-probs, values and entropies on ``batch`` (no grad):
        the numbers the step computes, for checks from outside."""
        with torch.no_grad():
            return self._policy_forward(batch, with_entropy=True)

    def _policy_forward(self, batch: PaddedBatch, with_entropy: bool) -> TokenOutputs:
        return self._forward(self.model.pretrained_model, batch, self.model.v_head, with_entropy)

    def _forward(self, lm: torch.nn.Module, batch: PaddedBatch, value_head: torch.nn.Module | None = None,
                 with_entropy: bool = False) -> TokenOutputs:
        """Per-token outputs of the causal LM ``lm`` (the policy's or the frozen reference) on
        ``batch``, with values when a ``value_head`` is given.

        Two savings that leave every number as the reference computes it:
        - rows are grouped by length into ``ppo.length_buckets`` groups, each padded only
          to its own longest row (a batch padded to its longest row is ~1/3 padding);
        - the LM head (and log-softmax) runs only where the next token is a response token,
          the only places whose log-probs the step uses.
        """
        order = torch.argsort(batch.attention_mask.sum(dim=1), stable=True)
        parts = [self._group_forward(lm, batch, rows, value_head, with_entropy)
                 for rows in torch.tensor_split(order, min(self.cfg.length_buckets, len(order)))]
        inverse = torch.argsort(order).to(self.device)
        cat = lambda xs: None if xs[0] is None else torch.cat(xs)[inverse]  # noqa: E731
        return TokenOutputs(cat([p.logp for p in parts]), cat([p.values for p in parts]),
                            cat([p.entropy for p in parts]))

    def _group_forward(self, lm: torch.nn.Module, batch: PaddedBatch, rows: torch.Tensor,
                       value_head: torch.nn.Module | None, with_entropy: bool) -> TokenOutputs:
        """``_forward`` on one group of rows, cropped to the columns that hold its real tokens."""
        width = batch.mask.shape[1]
        real = batch.attention_mask[rows].any(dim=0).nonzero()  # either padding side
        a, b = int(real.min()), int(real.max()) + 1
        ids = batch.input_ids[rows, a:b].to(self.device)
        sel = batch.mask[rows, a:b - 1].to(self.device).bool()  # (b, L-1): response positions
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
            hidden = lm.base_model(input_ids=ids, attention_mask=batch.attention_mask[rows, a:b].to(self.device),
                                   position_ids=batch.position_ids[rows, a:b].to(self.device),
                                   use_cache=False).last_hidden_state
            logits = lm.get_output_embeddings()(hidden[:, :-1][sel]).float()  # (N, V): response positions only
            values = None if value_head is None else _place(value_head(hidden)[:, :-1].float(), a, width)
        # One log-softmax over (N, V) serves the log-probs and, without grad (it is only a
        # statistic), the entropy -sum(p * log p) = logsumexp(l) - sum(softmax(l) * l).
        logp_all = torch.log_softmax(logits, dim=-1)
        logp = _scatter(logp_all.gather(-1, ids[:, 1:][sel].unsqueeze(-1)).squeeze(-1), sel, a, width)
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = _scatter(-(logp_all.exp() * logp_all).sum(-1), sel, a, width)
        return TokenOutputs(logp, values, entropy)

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
            return self._forward(self.model.pretrained_model, batch, self.model.v_head), None

    # ------------------------------------------------------------------ the PPO step

    def step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
             behaviour_logprobs: list[list[float]] | None = None) -> dict[str, float]:
        """One reference PPO step on a full batch; returns the reference's statistics.

        ``behaviour_logprobs`` (B, Lr_i), when given, are the log-probs of the policy that
        sampled the responses and serve as the old log-probs: with generation overlapped with
        the previous update (ppo.max_lag=1) that policy is one update behind the learner,
        and the PPO ratio must be taken against it.
        """
        self._tell_ranks("_step", queries, responses, scores, behaviour_logprobs)
        return self._step(queries, responses, scores, behaviour_logprobs)

    @_rng_kept_on_stop
    def _step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
              behaviour_logprobs: list[list[float]] | None = None) -> dict[str, float]:
        cfg = self.cfg
        if not len(queries) == len(responses) == len(scores) == cfg.batch_size:
            raise ValueError(f"step needs ppo.batch_size={cfg.batch_size} rollouts, got {len(queries)} queries, "
                             f"{len(responses)} responses, {len(scores)} scores")
        if any(len(r) == 0 for r in responses) or any(len(q) == 0 for q in queries):
            raise ValueError("every query and response needs at least one token")
        timing: dict[str, float] = {}
        t0 = time.perf_counter()
        scores_t = torch.tensor(scores, dtype=torch.float32)
        _check_finite("reward scores", scores_t, intact=True)
        batch = pad_batch(queries, responses, self.pad_id, self.padding_side)
        mask = batch.mask.to(self.device)
        n, ranks = cfg.batch_size, self.ranks
        # Each rank runs the passes on its own rows; the no-grad results are summed into
        # whole-batch tensors, so rewards, advantages and statistics are the whole batch's.
        lo, hi = ranks.own_rows(n)
        own = batch if ranks.world == 1 else batch.rows(torch.arange(lo, hi))

        # 1. forward passes (eval mode: dropout off): reference log-probs, old log-probs, old values
        with torch.no_grad():
            logp_ref = ranks.from_rows(self._forward(self.ref_model, own).logp, n)
        old, reusable = self._rollout_pass(own)
        logp_old, v_old = ranks.from_rows(old.logp, n), ranks.from_rows(old.values, n)
        if reusable is not None and ranks.world > 1:  # rows placed where the whole batch has them
            reusable = reusable.padded_rows(lo, n)
        if behaviour_logprobs is not None:
            flat = torch.tensor([lp for row in behaviour_logprobs for lp in row], device=self.device)
            logp_old = _scatter(flat, mask.bool(), 0, mask.shape[1])
        for what, t in (("policy log-probs", logp_old), ("values", v_old), ("reference log-probs", logp_ref)):
            _check_finite(what, t[mask.bool()], intact=True)
        beta = float(self.kl_ctl.value)
        # 3. per-token rewards;  4. GAE + whitening
        rewards, non_score = ppo.kl_rewards(logp_old, logp_ref, scores_t.to(self.device), mask, beta)
        values, advantages, returns = ppo.gae_advantages(v_old, rewards, mask, cfg.gamma, cfg.lam)
        timing["time/learner/forward"] = time.perf_counter() - t0

        # 5. epochs of minibatch updates, rows in the order self.row_order gives each epoch
        # (rank 0's orders: the other ranks take them from it, and each its own rows of each minibatch)
        t1 = time.perf_counter()
        mb_stats: list[dict[str, torch.Tensor]] = []
        orders = torch.tensor(np.asarray([self.row_order(n) for _ in range(cfg.ppo_epochs)]).reshape(-1, n)
                              if ranks.rank == 0 else np.zeros((cfg.ppo_epochs, n)), dtype=torch.long)
        orders = ranks.broadcast_(orders)
        epochs = (minibatches(order, cfg.mini_batch_size) for order in orders)
        for idx, reused in reuse_first(itertools.chain.from_iterable(epochs), reusable):
            n_tokens = mask[idx].sum()  # the whole minibatch's, on every rank
            if ranks.world > 1:
                keep = (idx >= lo) & (idx < hi)
                idx, reused = idx[keep], None if reused is None else reused.rows(keep)
            mb_stats.append(self._train_minibatch(batch.rows(idx), logp_old[idx], values[idx], advantages[idx],
                                                  returns[idx], n_tokens, intact=not mb_stats, outputs=reused))
        self.version += 1
        timing["time/learner/update"] = time.perf_counter() - t1

        # statistics, then 6. the KL controller update with this step's rollout KL
        stats = self._step_stats(queries, responses, scores_t, logp_old.cpu(), logp_ref.cpu(), non_score.cpu(),
                                 mask.cpu(), beta, mb_stats)
        self.kl_ctl.update(stats["objective/kl"], cfg.batch_size)
        stats.update(timing)
        return stats

    def _train_minibatch(self, mb: PaddedBatch, logp_old: torch.Tensor, v_old: torch.Tensor,
                         advantages: torch.Tensor, returns: torch.Tensor, n_tokens: torch.Tensor, intact: bool,
                         outputs: TokenOutputs | None = None) -> dict[str, torch.Tensor]:
        mask = mb.mask.to(self.device)
        if outputs is None and len(mask) == 0:  # this rank owns no row of the minibatch
            outputs = TokenOutputs(mask.clone(), mask.clone(), mask.clone())
        out_new = outputs or self._policy_forward(mb, with_entropy=True)
        out = ppo.ppo_loss(out_new.logp, logp_old, out_new.values, v_old, advantages, returns,
                           mask, out_new.entropy, self.cfg.cliprange, self.cfg.cliprange_value,
                           self.cfg.vf_coef, self.cfg.ratio_threshold,
                           n_tokens=n_tokens, total=self.ranks.total)
        _check_finite("PPO loss", out.stats["loss/total"], intact)  # every rank's sum; before backward: never step on NaN
        if out.skipped:
            log.warning("mean PPO ratio above ppo.ratio_threshold=%s: minibatch loss zeroed",
                        self.cfg.ratio_threshold)
        self.optimizer.zero_grad(set_to_none=False)
        if out.loss.requires_grad:  # not on a rank with no row here: its gradient is zero
            out.loss.backward()
        self.ranks.sum_grads_(list(self.model.parameters()))
        _check_finite_grads(self.model, intact)
        self.optimizer.step()
        return {k: v.detach().cpu() for k, v in out.stats.items()}

    def _step_stats(self, queries, responses, scores, logp_old, logp_ref, non_score, mask, beta,
                    mb_stats) -> dict[str, float]:
        kl_per_seq = ((logp_old - logp_ref) * mask).sum(dim=1)
        q_lens = torch.tensor([len(q) for q in queries], dtype=torch.float32)
        r_lens = torch.tensor([len(r) for r in responses], dtype=torch.float32)
        stats = {
            "objective/kl": kl_per_seq.mean(),
            "objective/kl_coef": torch.tensor(beta),
            "objective/entropy": (-logp_old * mask).sum(dim=1).mean(),
            "ppo/mean_non_score_reward": ppo.masked_mean(non_score, mask),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": scores.std(),
            "tokens/queries_len_mean": q_lens.mean(),
            "tokens/queries_len_std": q_lens.std(),
            "tokens/responses_len_mean": r_lens.mean(),
            "tokens/responses_len_std": r_lens.std(),
        }
        for key in mb_stats[0]:
            stats[f"ppo/{key}"] = torch.stack([s[key] for s in mb_stats]).mean()
        stats["ppo/val/var_explained"] = 1 - stats["ppo/val/error"] / stats["ppo/returns/var"]
        out = {k: float(v) for k, v in stats.items()}
        out["ppo/learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        out["env/reward_mean"] = float(scores.mean())
        out["env/reward_std"] = float(scores.std())
        return out

    # ------------------------------------------------------------------ weights and saving

    def weights(self) -> tuple[int, dict[str, np.ndarray]]:
        """(version, weights): call with ``num_returns=2`` so the weights stay in the object store."""
        return self.version, self.get_weights()

    # -- the collective path (cluster.weight_broadcast=collective): rank 0 of a WeightGroup

    def weight_group_address(self) -> str:
        """tcp://<this node>:<free port>: the group's rendezvous lives with rank 0."""
        return collective.local_init_method()

    def join_weight_group(self, init_method: str, world_size: int, backend: str, timeout_s: float) -> None:
        self.leave_weight_group()
        device = self.device if backend == "nccl" else torch.device("cpu")
        self.group = collective.WeightGroup(init_method, 0, world_size, backend, timeout_s, device=device)

    def send_weights(self) -> int:
        """Broadcast the live LM weights with their version to every rollout actor."""
        collective.send(self.group, self.version, collective.lm_tensors(self.model.pretrained_model))
        return self.version

    def leave_weight_group(self) -> None:
        if getattr(self, "group", None) is not None:
            self.group.destroy()
        self.group = None

    def get_weights(self) -> dict[str, np.ndarray]:
        """The causal LM's weights as numpy (zero-copy in Ray's object store), tied copies once."""
        return numpy_copies(self.model.pretrained_model)

    def export_policy(self) -> dict[str, bytes]:
        """The tuned policy folder as {file name: bytes}, so the driver writes it wherever
        the run directory is (the learner may sit on another node)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_policy(self.model, self.tokenizer, tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    def state_bytes(self) -> dict[str, bytes]:
        """Everything needed to continue exactly (weights, Adam, KL coefficient, RNGs, version) as
        data only: {file name: bytes} in safetensors and JSON (learner.checkpoint.pack_learner)."""
        from learner.checkpoint import pack_learner

        meta = {"kl_coef": float(self.kl_ctl.value), "numpy_rng": self.rng.bit_generator.state,
                "version": self.version}
        return pack_learner(self.model, self.optimizer, meta, torch.get_rng_state())

    def load_state_bytes(self, files: dict[str, bytes]) -> int:
        """Restores ``state_bytes``' files; nothing in them is unpickled. Returns the version."""
        self._tell_ranks("_load_state_bytes", files)
        return self._load_state_bytes(files)

    def _load_state_bytes(self, files: dict[str, bytes]) -> int:
        from learner.checkpoint import unpack_learner

        meta, torch_rng = unpack_learner(files, self.model, self.optimizer)
        # Adam's state carries the saved run's learning rate; this run's setting wins, so
        # --ppo.learning_rate on --resume takes effect (the moments are kept).
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.learning_rate
        self.kl_ctl.value = meta["kl_coef"]
        self.rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(torch_rng)
        self.version = meta["version"]
        return self.version

    def weights_fingerprint(self) -> tuple[int, list[float]]:
        """(version, actors.fingerprint of the LM weights): what every rollout actor must report."""
        from actors.fingerprint import fingerprint

        return self.version, fingerprint(collective.lm_tensors(self.model.pretrained_model))

    def ping(self) -> dict:
        """pid, node, device and weight version, for the driver's start-up log and health checks."""
        ranks = {"rank_pids": [c.pid for c in self.ranks.children]} if self.ranks.children else {}
        return {**process_info(self.device), "version": self.version, **ranks}
