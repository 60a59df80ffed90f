"""Sampling a batch of left-padded queries, each row up to its own drawn length, behind one interface.

A ``Sampler`` takes the left-padded batch, each row's drawn length, the ids that end a response
(the tokenizer's EOS and any other the model's generation config names, e.g. a chat model's
end-of-turn) and the logits processors that pick each token (``actors.rollout.sampling_processors``),
and returns each row's response, cut at its drawn length and after its first end id (kept), with the log-prob of every
response token under the raw policy (fp32 logits, before any warper). Two backends:

- ``CacheLoopSampler`` (``sample_responses``): a hand-written KV-cache loop in which a finished row
  leaves the batch and the cache, so no row is computed past its end (BENCHMARKS.md has the gain).
  It needs a model whose forward takes a ``DynamicCache``, ``position_ids`` and ``logits_to_keep``.
- ``GenerateSampler`` (``generate_responses``): transformers' ``generate``, which any causal LM
  supports; every row stays in the batch until the last one ends.

``choose_sampler`` picks the loop where ``cache_loop_unsupported`` finds nothing missing, ``generate``
otherwise. Both backends draw one uniform number per still-sampling row and step, in row order, so
from the same generator they draw the same tokens.
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol, Sequence

import torch
from transformers import (DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, PreTrainedModel,
                          StoppingCriteria, StoppingCriteriaList)

logger = logging.getLogger(__name__)

Responses = tuple[list[list[int]], list[list[float]]]
"""Each row's response token ids (B, Lr_i) and their log-probs (B, Lr_i)."""

EosIds = int | Sequence[int]
"""The token id(s) that end a response; the first is also the padding ``generate`` is given."""


def eos_tuple(eos: EosIds) -> tuple[int, ...]:
    """``eos`` as a tuple of ids."""
    return (int(eos),) if isinstance(eos, int) else tuple(int(i) for i in eos)


def _cut(row: list[int], eos: tuple[int, ...]) -> int:
    """The length of ``row`` up to and with its first end id (the whole row if none)."""
    return next((i + 1 for i, tok in enumerate(row) if tok in eos), len(row))


class InverseCdfSampling(LogitsProcessor):
    """Draws each row's next token from softmax(scores) with one uniform number (the inverse of
    the cumulative distribution, summed in float64), and returns scores that only the drawn
    token tops, so an argmax picks the draw. Only the running sum is in float64, so
    the last entries of a 50k vocabulary are not lost to rounding.

    Why not the sampling of transformers' ``generate``: ``torch.multinomial`` draws one
    exponential number per vocabulary entry and row, a large part of a rollout actor's time on
    CPU (BENCHMARKS.md). The distribution is the same; the tokens a given seed draws are not.
    """

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        cdf = torch.softmax(scores.float(), dim=-1).cumsum(dim=-1, dtype=torch.float64)  # as generate: fp32 softmax
        u = torch.rand((len(scores), 1), generator=self.generator, dtype=torch.float64, device=scores.device)
        # The first entry whose cumulative sum exceeds u: entries of probability 0 (cut by top-k/top-p)
        # never are, since their sum equals the one before them.
        drawn = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=scores.shape[-1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)


class Sampler(Protocol):
    """Samples one response per left-padded row; the model is the backend's own."""

    name: str
    """What the worker logs and reports (``RolloutWorker.ping``)."""

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: Sequence[int], eos: EosIds,
               processors: LogitsProcessorList) -> Responses:
        """input_ids and attention_mask (B, P), left-padded; row i stops after ``lengths[i]`` tokens or
        at its first id of ``eos`` (kept). ``processors`` pick each token: their output must be topped by
        the drawn token only (``InverseCdfSampling`` last), since the pick is their argmax."""
        ...


def cache_loop_unsupported(model: PreTrainedModel) -> str | None:
    """Why the KV-cache loop cannot sample with ``model``, or None if it can.

    The loop passes a ``DynamicCache`` it made, ``position_ids`` that count only real tokens
    (left padding) and ``logits_to_keep=1`` to the causal LM's forward, and drops finished rows
    with ``DynamicCache.batch_select_indices``, which keeps only keys and values: a model with a
    recurrent state (``_is_stateful``: Mamba, hybrid linear-attention models) or its own cache
    class would lose or mix rows' states. A signature check, made once when the model is loaded.
    """
    if model.config.is_encoder_decoder:
        return "an encoder-decoder model"
    if getattr(model, "_is_stateful", False):
        return "a model with a recurrent state"
    supports_dynamic = getattr(model, "_supports_default_dynamic_cache", None)
    if supports_dynamic is not None and not supports_dynamic():
        return "a model with its own cache class"
    if not callable(getattr(DynamicCache, "batch_select_indices", None)):
        return "DynamicCache has no batch_select_indices in this transformers"
    params = inspect.signature(model.forward).parameters
    missing = [name for name in ("position_ids", "logits_to_keep") if name not in params]
    if "cache" not in params and "past_key_values" not in params:
        missing.append("a cache argument")
    return f"its forward takes no {', '.join(missing)}" if missing else None


def choose_sampler(model: PreTrainedModel) -> Sampler:
    """The KV-cache loop where the model supports it, ``generate`` otherwise; logs the choice."""
    reason = cache_loop_unsupported(model)
    if reason is None:
        logger.info("sampling with the KV-cache loop (%s)", type(model).__name__)
        return CacheLoopSampler(model)
    logger.info("sampling with transformers' generate: the KV-cache loop cannot run %s (%s)",
                type(model).__name__, reason)
    return GenerateSampler(model)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name a model's forward takes its KV cache by: recent transformers 5 releases call it
    ``cache`` (``past_key_values`` still works there, with a warning that it goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _new_cache(model: PreTrainedModel) -> DynamicCache:
    """An empty DynamicCache laid out as the model lays out its own (sliding-window layers
    included) where this transformers builds one from the config."""
    if "config" in inspect.signature(DynamicCache).parameters:
        return DynamicCache(config=model.config)
    return DynamicCache()


def sample_responses(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     lengths: Sequence[int], eos: EosIds, processors: LogitsProcessorList) -> Responses:
    """The KV-cache loop: samples one response per left-padded row (B, P), token by token;
    returns each row's tokens (B, Lr_i) and their log-probs (B, Lr_i).

    A row stops at its drawn length ``lengths[i]`` or at its first id of ``eos`` (kept), and then leaves
    the batch and the cache, so no row is computed past its end (``generate`` runs every row to
    the longest drawn length). Each token is drawn by ``processors``, whose output only the
    drawn token tops (``InverseCdfSampling``). Log-probs come from the raw logits (before any
    warper) in fp32: the policy's own log pi(token | prefix), the quantity PPO's ratio needs.
    """
    device = input_ids.device
    stop = torch.tensor(eos_tuple(eos), device=device)
    responses: list[list[int]] = [[] for _ in lengths]
    logprobs: list[list[float]] = [[] for _ in lengths]
    rows = list(range(len(lengths)))  # the rows still sampling, as indices into the batch
    limit = torch.tensor(list(lengths), device=device)  # (b,) the remaining rows' drawn lengths
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: queries start at position 0
    seen = input_ids  # (b, P + t): what the processors are given as input_ids
    cache = _new_cache(model)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions,
              _cache_argument(model): cache, "use_cache": True, "logits_to_keep": 1}
    with torch.no_grad():
        for t in range(max(lengths)):
            raw = model(**inputs).logits[:, -1].float()  # (b, V): each row's last position
            token = processors(seen, raw).argmax(dim=-1)  # (b,)
            logp = torch.log_softmax(raw, dim=-1).gather(-1, token[:, None]).squeeze(-1)  # (b,)
            for i, tok, lp in zip(rows, token.tolist(), logp.tolist()):
                responses[i].append(tok)
                logprobs[i].append(lp)
            going = ~torch.isin(token, stop) & (limit > t + 1)  # (b,)
            if not bool(going.any()):
                break
            positions = positions[:, -1:] + 1  # (b, 1)
            mask = inputs["attention_mask"]
            if not bool(going.all()):  # finished rows leave the batch and the cache
                keep = going.nonzero().squeeze(-1)
                cache.batch_select_indices(keep)
                rows = [rows[k] for k in keep.tolist()]
                limit, token, positions, mask, seen = limit[keep], token[keep], positions[keep], mask[keep], seen[keep]
            seen = torch.cat([seen, token[:, None]], dim=1)
            inputs.update(input_ids=token[:, None], position_ids=positions,
                          attention_mask=torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1))
    return responses, logprobs


class _DrawnLengths(StoppingCriteria):
    """Ends each row of ``generate`` at its drawn length (EOS ends rows through generate's own check)."""

    def __init__(self, width: int, limit: torch.Tensor) -> None:
        self.width, self.limit = width, limit  # P, (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor | None, **kwargs) -> torch.Tensor:
        return self.limit <= input_ids.shape[1] - self.width  # (B,)


class _SamplingRowsOnly(LogitsProcessor):
    """Runs ``processors`` on the rows still sampling only. ``generate`` keeps finished rows in the
    batch (and replaces their picks by padding); leaving them out keeps one uniform number per
    sampling row and step, in row order, as the KV-cache loop draws, so both backends draw the same
    tokens from the same generator."""

    def __init__(self, processors: LogitsProcessorList, width: int, limit: torch.Tensor, stop: torch.Tensor) -> None:
        self.processors, self.width, self.limit, self.stop = processors, width, limit, stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.width:]  # (B, t): the tokens generated so far
        ended = torch.isin(new, self.stop).any(dim=-1)  # (B,)
        sampling = (~ended & (self.limit > new.shape[1])).nonzero().squeeze(-1)  # (b,)
        out = scores.clone()  # finished rows: any pick, generate pads it
        if len(sampling):
            out[sampling] = self.processors(input_ids[sampling], scores[sampling])
        return out


def generate_responses(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       lengths: Sequence[int], eos: EosIds, processors: LogitsProcessorList) -> Responses:
    """``sample_responses`` through transformers' ``generate``: greedy picks over the processed
    scores (the processors' draw), every row run until all have ended, then each cut at its drawn
    length and after its first id of ``eos`` (kept). Log-probs from generate's raw fp32 logits.

    ``generate`` builds position ids that count real tokens from the attention mask itself (as
    the loop does, for left padding). Only the generation config given here counts: the model's
    own (generation_config.json: penalties, minimum lengths, ...) is set aside for the call.
    """
    width, eos = input_ids.shape[1], eos_tuple(eos)
    limit, stop = torch.tensor(list(lengths), device=input_ids.device), torch.tensor(eos, device=input_ids.device)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max(lengths), min_length=0,
                              eos_token_id=list(eos), pad_token_id=eos[0],
                              output_logits=True, return_dict_in_generate=True)
    own, model.generation_config = model.generation_config, GenerationConfig()
    try:
        with torch.no_grad():
            picks = LogitsProcessorList([_SamplingRowsOnly(processors, width, limit, stop)])
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 logits_processor=picks,
                                 stopping_criteria=StoppingCriteriaList([_DrawnLengths(width, limit)]))
    finally:
        model.generation_config = own
    tokens = out.sequences[:, width:]  # (B, T)
    logp = torch.stack([torch.log_softmax(raw.float(), dim=-1).gather(-1, tokens[:, t, None]).squeeze(-1)
                        for t, raw in enumerate(out.logits)], dim=1)  # (B, T), one (B, V) step at a time
    responses, logprobs = [], []
    for row, row_logp, length in zip(tokens.tolist(), logp.tolist(), lengths):
        row = row[:length]
        n = _cut(row, eos)
        responses.append(row[:n])
        logprobs.append(row_logp[:n])
    return responses, logprobs


@dataclass(frozen=True)
class _ModelSampler:
    """A backend: one of the sampling functions above, applied to the backend's own model."""

    model: PreTrainedModel
    name: ClassVar[str]
    draw: ClassVar[Callable[..., Responses]]

    def sample(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lengths: Sequence[int], eos: EosIds,
               processors: LogitsProcessorList) -> Responses:
        return self.draw(self.model, input_ids, attention_mask, lengths, eos, processors)


class CacheLoopSampler(_ModelSampler):
    """The KV-cache loop (``sample_responses``); for models ``cache_loop_unsupported`` accepts."""

    name = "cache-loop"
    draw = staticmethod(sample_responses)


class GenerateSampler(_ModelSampler):
    """transformers' ``generate`` (``generate_responses``); for any causal LM."""

    name = "generate"
    draw = staticmethod(generate_responses)
