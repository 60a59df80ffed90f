"""A batch of query+response rows, and the per-token outputs of a causal LM on it.

The forward pass here is the learner's: the policy's log-probs, values and entropies, or the
frozen reference's log-probs, at the positions whose next token is a response token. Two
savings leave every number as the reference step computes it (docs/ppo-step.md):

- rows are grouped by length into ``ppo.length_buckets`` groups, each padded only to its own
  longest row (a batch padded to its longest row is mostly padding when lengths vary);
- the LM head and log-softmax run only where the next token is a response token, the only
  places whose log-probs the step uses. A model whose causal LM changes the logits after its
  head (Gemma 2's soft-capping, a logit scale; ``plain_head`` finds out) runs whole instead,
  so its log-probs are the ones its rollout actors sample from.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from learner.core import ppo


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

    def detach(self) -> "TokenOutputs":
        keep = lambda x: None if x is None else x.detach()  # noqa: E731
        return TokenOutputs(self.logp.detach(), keep(self.values), keep(self.entropy))


RowOrder = Callable[[int], Sequence[int]]
"""Gives one epoch's row order for a batch of n rows. The reference draws
``np.random.permutation(n)`` each epoch; the golden test passes the orders it recorded."""


def minibatches(order: Sequence[int], mini_batch_size: int) -> list[torch.Tensor]:
    """One epoch's minibatches: consecutive slices of ``order``, as the reference takes them."""
    order = torch.as_tensor(np.asarray(order), dtype=torch.long)
    return list(torch.split(order, mini_batch_size))


def share(idx: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of the rows ``idx`` among ``world`` ranks: the slices
    cover ``idx`` once, in order, and differ in size by at most one row."""
    n = len(idx)
    return idx[n * rank // world:n * (rank + 1) // world]


def scatter(flat: torch.Tensor, sel: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Values for the True entries of ``sel`` (b, w) into a zero (b, width) tensor whose
    columns start..start+w they fill, keeping grad."""
    out = torch.zeros(sel.shape, dtype=flat.dtype, device=flat.device).masked_scatter(sel, flat)
    return _place(out, start, width)


def _place(x: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """(b, w) columns placed at start..start+w of a zero-padded (b, width) tensor."""
    return torch.nn.functional.pad(x, (start, width - start - x.shape[1]))


_PLAIN_HEAD: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def plain_head(lm: torch.nn.Module) -> bool:
    """Whether the causal LM's logits are its output embeddings applied to its base model's last
    hidden state (GPT-2, Llama, Qwen2, GPT-NeoX, ...), which lets the learner apply the head at
    response positions only. Probed once per model: a last hidden state whose logits reach +-100
    is put in place of the base model's (a forward hook), and the causal LM's logits compared
    with the head's, so a cap or a scale (Gemma 2's soft-capping at 30, Cohere's 1/16) shows."""
    if lm not in _PLAIN_HEAD:
        head = lm.get_output_embeddings()
        weight = head.weight
        hidden = torch.randn((1, 2, weight.shape[1]), generator=torch.Generator().manual_seed(0))
        hidden = hidden.to(weight.device, weight.dtype)
        with torch.no_grad(), torch.autocast(weight.device.type, enabled=False):  # bf16 would blur the comparison
            hidden = hidden * (100.0 / head(hidden).abs().max().clamp(min=1e-6))
            handle = lm.base_model.register_forward_hook(lambda module, args, out: _replaced(out, hidden))
            try:
                logits = lm(input_ids=torch.zeros((1, 2), dtype=torch.long, device=weight.device),
                            use_cache=False).logits
            finally:
                handle.remove()
            _PLAIN_HEAD[lm] = torch.allclose(logits.float(), head(hidden).float(), rtol=1e-4, atol=1e-3)
    return _PLAIN_HEAD[lm]


def _replaced(out: Any, hidden: torch.Tensor) -> Any:
    out.last_hidden_state = hidden
    return out


def _hidden_and_logits(lm: torch.nn.Module, inputs: dict[str, torch.Tensor], sel: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The last hidden state (B, L, H) and the logits at the selected positions (N, V): the head
    alone where ``plain_head``, else the whole causal LM, its base model's output caught by a hook."""
    if plain_head(lm):
        hidden = lm.base_model(**inputs, use_cache=False).last_hidden_state
        return hidden, lm.get_output_embeddings()(hidden[:, :-1][sel])
    caught: dict[str, torch.Tensor] = {}
    handle = lm.base_model.register_forward_hook(
        lambda module, args, out: caught.__setitem__("hidden", out.last_hidden_state))
    try:
        logits = lm(**inputs, use_cache=False).logits  # (B, L, V)
    finally:
        handle.remove()
    return caught["hidden"], logits[:, :-1][sel]


def forward(lm: torch.nn.Module, batch: PaddedBatch, device: torch.device, buckets: int, bf16: bool = False,
            value_head: torch.nn.Module | None = None, with_entropy: bool = False) -> TokenOutputs:
    """Per-token outputs of the causal LM ``lm`` (the policy's or the frozen reference) on
    ``batch``, with values when a ``value_head`` is given; rows in ``buckets`` length groups."""
    order = torch.argsort(batch.attention_mask.sum(dim=1), stable=True)
    parts = [_group_forward(lm, batch, rows, device, bf16, value_head, with_entropy)
             for rows in torch.tensor_split(order, min(buckets, len(order)))]
    inverse = torch.argsort(order).to(device)
    cat = lambda xs: None if xs[0] is None else torch.cat(xs)[inverse]  # noqa: E731
    return TokenOutputs(cat([p.logp for p in parts]), cat([p.values for p in parts]),
                        cat([p.entropy for p in parts]))


def _group_forward(lm: torch.nn.Module, batch: PaddedBatch, rows: torch.Tensor, device: torch.device, bf16: bool,
                   value_head: torch.nn.Module | None, with_entropy: bool) -> TokenOutputs:
    """``forward`` on one group of rows, cropped to the columns that hold its real tokens."""
    width = batch.mask.shape[1]
    real = batch.attention_mask[rows].any(dim=0).nonzero()  # either padding side
    a, b = int(real.min()), int(real.max()) + 1
    ids = batch.input_ids[rows, a:b].to(device)
    sel = batch.mask[rows, a:b - 1].to(device).bool()  # (b, L-1): response positions
    inputs = {"input_ids": ids, "attention_mask": batch.attention_mask[rows, a:b].to(device),
              "position_ids": batch.position_ids[rows, a:b].to(device)}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        hidden, logits = _hidden_and_logits(lm, inputs, sel)
        logits = logits.float()  # (N, V): response positions only
        values = None if value_head is None else _place(value_head(hidden)[:, :-1].float(), a, width)
    # One log-softmax over (N, V) serves the log-probs and, without grad (it is only a
    # statistic), the entropy -sum(p * log p).
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = scatter(logp_all.gather(-1, ids[:, 1:][sel].unsqueeze(-1)).squeeze(-1), sel, a, width)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = scatter(-(logp_all.exp() * logp_all).sum(-1), sel, a, width)
    return TokenOutputs(logp, values, entropy)
