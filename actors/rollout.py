"""Rollout worker: samples responses to IMDB query openings with the current policy.

A plain Python class; the driver makes it an actor with ``ray.remote(...)(RolloutWorker)``.
Each PPO step the driver splits the step's queries into shards, one per worker; a worker
samples its shard in one batched loop (``sample_responses``) and (in ``rollout``) sends the
texts to a sentiment scorer.

Sampling is the reference recipe's (docs/seed.md): top_k=0, top_p=1.0, temperature 1,
``max_new_tokens`` drawn uniformly from [response_min_tokens, response_max_tokens] per query,
EOS ends a response and stays in it. Sampling a batch, each row up to its own length, samples
the same distribution as one query at a time.

Two faults of the original notebook are avoided on purpose: it generated one query at a time
(slow), and it cut responses with ``[-gen_len:]``, which takes query tokens when EOS ends a
response early. Here each response holds only the tokens sampled for it.
"""
from __future__ import annotations

import inspect
import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, DynamicCache, LogitsProcessor, LogitsProcessorList,
                          PreTrainedModel, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from actors.settings import RolloutSettings
from modelhost.loading import load_model_and_tokenizer
from modelhost.process import process_info, resolve_device
from modelhost.weights import distinct_tensors, numpy_copies, tied_duplicates

logger = logging.getLogger(__name__)


@dataclass
class Rollout:
    """What a rollout worker returns for its shard of one step's queries.

    B is the shard's number of queries; Lq_i and Lr_i the i-th query's and response's lengths.
    """

    queries: list[list[int]]
    """(B, Lq_i) policy token ids of the queries, as given."""
    responses: list[list[int]]
    """(B, Lr_i) sampled token ids, cut to the query's drawn length and after the first EOS (EOS kept)."""
    texts: list[str]
    """(B,) decode(query + response, skip_special_tokens=True): what the reward model reads.
    The notebook kept <|endoftext|> in the text; skipping it is a deliberate change."""
    logprobs: list[list[float]]
    """(B, Lr_i) behaviour-policy log-prob of each response token, from the raw logits in fp32."""
    scores: list[float] | None
    """(B,) reward per sequence; None until scored."""
    weight_version: int
    """Version of the weights that generated these (the learner's update count at sync)."""
    step: int
    """PPO step the queries belong to."""
    shard: int
    """Which shard of the step's queries this is."""
    generate_seconds: float
    """Wall time of padding, sampling and decoding."""
    score_seconds: float
    """Wall time of scoring (0.0 until scored)."""
    weight_fingerprint: list[float] | None = None
    """actors.fingerprint of the weights that generated these: the driver checks it against the learner's."""


def draw_lengths_and_seed(settings: RolloutSettings, step: int, shard: int, n: int) -> tuple[list[int], int]:
    """Per-query response lengths and the torch sampling seed, both from (seed, step, shard).

    Two independent child streams, so the torch seed does not depend on the shard size.
    """
    length_seq, torch_seq = np.random.SeedSequence([settings.seed, step, shard]).spawn(2)
    lengths = np.random.default_rng(length_seq).integers(
        settings.response_min_tokens, settings.response_max_tokens + 1, size=n)
    return [int(x) for x in lengths], int(torch_seq.generate_state(1, dtype=np.uint64)[0])


def left_pad(queries: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pads token-id lists so every query ends where generation starts.

    Returns input_ids (B, P) and attention_mask (B, P), P the longest query.
    """
    width = max(len(q) for q in queries)
    input_ids = torch.full((len(queries), width), pad_id, dtype=torch.long)  # (B, P)
    attention_mask = torch.zeros((len(queries), width), dtype=torch.long)  # (B, P)
    for i, query in enumerate(queries):
        if query:
            input_ids[i, width - len(query):] = torch.tensor(query, dtype=torch.long)
            attention_mask[i, width - len(query):] = 1
    return input_ids, attention_mask


class InverseCdfSampling(LogitsProcessor):
    """Draws each row's next token from softmax(scores) with one uniform number (the inverse of
    the cumulative distribution, summed in float64), and returns scores that only the drawn
    token tops, so an argmax picks the draw. Only the running sum is in float64, so
    the last entries of a 50k vocabulary are not lost to rounding.

    Why not the sampling of transformers' ``generate``: ``torch.multinomial`` draws one
    exponential number per vocabulary entry and row; on CPU that was 29% of a rollout actor's
    generation (11 ms a token for 64 rows of an 8192-token vocabulary, against about 1 ms here).
    The distribution is the same; the tokens a given seed draws are not.
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


def sampling_processors(settings: RolloutSettings, generator: torch.Generator) -> LogitsProcessorList:
    """The recipe's warpers in transformers' ``generate`` order (temperature, top-k, top-p), then the draw."""
    warpers = ([TemperatureLogitsWarper(settings.temperature)] if settings.temperature != 1.0 else []) + \
        ([TopKLogitsWarper(settings.top_k)] if settings.top_k > 0 else []) + \
        ([TopPLogitsWarper(settings.top_p)] if settings.top_p < 1.0 else [])
    return LogitsProcessorList([*warpers, InverseCdfSampling(generator)])


def _cache_argument(model: torch.nn.Module) -> str:
    """The name a model's forward takes its KV cache by: recent transformers 5 releases call it
    ``cache`` (``past_key_values`` still works there, with a warning that it goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def sample_responses(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     lengths: Sequence[int], eos_id: int, processors: LogitsProcessorList
                     ) -> tuple[list[list[int]], list[list[float]]]:
    """Samples one response per left-padded row (B, P), token by token with a KV cache; returns
    each row's tokens (B, Lr_i) and their log-probs (B, Lr_i).

    A row stops at its drawn length ``lengths[i]`` or at its first EOS (kept), and then leaves
    the batch and the cache. Why not ``model.generate``: it runs every row to the longest drawn
    length and the excess is cut off afterwards; lengths are drawn uniformly from 4..16 in the
    recipe, so over a third of its row-tokens were thrown away (64 rows of the stand-in on one
    core: 0.47 s with generate, 0.32 s here; BENCHMARKS.md section 2). Each token is drawn by
    ``processors``, whose output only the drawn token tops (``sampling_processors``).

    Log-probs come from the raw logits (before any warper) in fp32, so they are the policy's own
    log pi(token | prefix), the quantity PPO's ratio needs; with the recipe's sampling the
    warpers are identities anyway.
    """
    device = input_ids.device
    responses: list[list[int]] = [[] for _ in lengths]
    logprobs: list[list[float]] = [[] for _ in lengths]
    rows = list(range(len(lengths)))  # the rows still sampling, as indices into the batch
    limit = torch.tensor(list(lengths), device=device)  # (b,) the remaining rows' drawn lengths
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: queries start at position 0
    seen = input_ids  # (b, P + t): what the processors are given as input_ids
    cache = DynamicCache()
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": positions,
              _cache_argument(model.base_model): cache, "use_cache": True}
    head = model.get_output_embeddings()
    with torch.no_grad():
        for t in range(max(lengths)):
            hidden = model.base_model(**inputs).last_hidden_state[:, -1]  # (b, H): each row's last position
            raw = head(hidden).float()  # (b, V)
            token = processors(seen, raw).argmax(dim=-1)  # (b,)
            logp = torch.log_softmax(raw, dim=-1).gather(-1, token[:, None]).squeeze(-1)  # (b,)
            for i, tok, lp in zip(rows, token.tolist(), logp.tolist()):
                responses[i].append(tok)
                logprobs[i].append(lp)
            going = (token != eos_id) & (limit > t + 1)  # (b,)
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


class RolloutWorker:
    """Generates (and optionally scores) one shard of a PPO step's queries with the current policy."""

    def __init__(self, settings: RolloutSettings, scorers: Sequence[Any] = ()) -> None:
        """``scorers``: objects with ``score(texts)``, Ray actor handles of such, or the names of
        such Ray actors in this job's namespace. The driver passes names: Ray 2.60 logs an ERROR
        ("constructor arguments in the object store and max_restarts > 0") for a restartable
        actor whose constructor arguments hold actor handles (or anything over 100 KB); names
        are small plain strings, looked up at the first rollout."""
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.scorers = list(scorers)
        self.device = resolve_device(settings.device)
        self.model, self.tokenizer = load_model_and_tokenizer(AutoModelForCausalLM, settings.policy, "policy model")
        # The recipe pads with EOS (GPT-2 has no pad token); left padding so generation continues each query.
        self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"
        self.eos_id = int(self.tokenizer.eos_token_id)
        self.model.to(self.device).eval()
        self.max_positions = int(getattr(self.model.config, "n_positions",
                                         getattr(self.model.config, "max_position_embeddings", 0)))
        self._tied = tied_duplicates(self.model)
        self._weight_version = 0
        logger.info("rollout worker pid %d: %s on %s, %d torch threads", os.getpid(), settings.policy,
                    self.device, settings.torch_threads)

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def load_weights(self, weights: dict[str, np.ndarray | torch.Tensor], version: int) -> int:
        """Copies a full set of policy weights in place (names as in the causal LM's state_dict)."""
        params = self.model.state_dict()
        unknown = sorted(set(weights) - set(params))
        missing = sorted(set(params) - set(weights) - self._tied)
        if unknown or missing:
            raise ValueError(f"load_weights: unknown names {unknown[:5]}{'...' if len(unknown) > 5 else ''}, "
                             f"missing names {missing[:5]}{'...' if len(missing) > 5 else ''}")
        # A tied name (lm_head.weight) may be given too: it writes the same storage as its twin.
        with torch.no_grad(), warnings.catch_warnings():
            # Arrays from Ray's object store are read-only; they are only read here, so the
            # "non-writable array" warning of torch.as_tensor does not apply.
            warnings.simplefilter("ignore", UserWarning)
            for name, value in weights.items():
                source = torch.as_tensor(value)
                if source.shape != params[name].shape:
                    raise ValueError(f"load_weights: {name} has shape {tuple(source.shape)}, "
                                     f"the model's is {tuple(params[name].shape)}")
                params[name].copy_(source)
        self._weight_version = int(version)
        logger.debug("loaded weights version %d", version)
        return self._weight_version

    def weight_fingerprint(self) -> list[float]:
        """The fingerprint (actors.fingerprint) of the weights this worker holds now."""
        from actors.fingerprint import fingerprint

        return fingerprint(distinct_tensors(self.model).values())  # the learner's tensors, in its order

    def get_weights(self) -> dict[str, np.ndarray]:
        """The policy's state_dict as numpy copies, tied duplicates omitted."""
        return numpy_copies(self.model)

    # ------------------------------------------------------------ collective weight broadcast

    def join_weight_group(self, init_method: str, rank: int, world_size: int, backend: str = "gloo",
                          timeout_s: float = 300.0, keep_buffers: bool = True) -> None:
        """Joins the learner's weight group (``actors.collective.WeightGroup``) as ``rank`` (> 0).

        Blocks until every rank has joined: the driver calls it on all members at once. Leaves
        this worker's previous group first, if any. NCCL needs the worker on a CUDA device; with
        gloo the buffers are on the CPU whatever the worker's device. ``keep_buffers``: keep the
        receive buffer between broadcasts (one extra copy of the weights in memory; see WeightGroup).
        """
        from actors.collective import WeightGroup

        if rank < 1:
            raise ValueError(f"a rollout worker receives weights: its rank must be >= 1 (0 is the sender), got {rank}")
        if backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"backend 'nccl' needs the rollout worker on a CUDA device; it is on {self.device}")
        self.leave_weight_group()
        self._weight_group = WeightGroup(init_method, rank, world_size, backend, timeout_s,
                                         group_name=f"weights-rank{rank}",
                                         device=self.device if backend == "nccl" else "cpu",
                                         keep_buffers=keep_buffers)

    def receive_weights(self) -> int:
        """Receives one versioned broadcast of the learner's weights in place; returns (and holds) its version.

        The tensors are the causal LM's state_dict without tied duplicates, in state_dict order:
        the order the learner sends. A layout mismatch raises ``WeightLayoutError`` and leaves the
        weights and version as they were.
        """
        from actors.collective import lm_tensors, receive

        group = getattr(self, "_weight_group", None)
        if group is None:
            raise RuntimeError("receive_weights: this rollout worker is in no weight group; call join_weight_group first")
        self._weight_version = receive(group, lm_tensors(self.model))
        logger.debug("received weights version %d", self._weight_version)
        return self._weight_version

    def leave_weight_group(self) -> None:
        """Leaves the weight group, if in one (safe to call at any time)."""
        group = getattr(self, "_weight_group", None)
        self._weight_group = None
        if group is not None:
            group.destroy()

    def generate(self, queries: list[list[int]], step: int, shard: int) -> Rollout:
        """Samples one response per query in one batched loop (``sample_responses``); scores stay None."""
        queries = self._checked_queries(queries)
        start = time.perf_counter()
        lengths, torch_seed = draw_lengths_and_seed(self.settings, step, shard, len(queries))
        input_ids, attention_mask = left_pad(queries, self.eos_id)
        generator = torch.Generator(self.device).manual_seed(torch_seed)
        responses, logprobs = sample_responses(
            self.model, input_ids.to(self.device), attention_mask.to(self.device), lengths, self.eos_id,
            sampling_processors(self.settings, generator))
        texts = self.tokenizer.batch_decode([q + r for q, r in zip(queries, responses)],
                                            skip_special_tokens=True)
        return Rollout(queries=queries, responses=responses, texts=texts,
                       logprobs=logprobs, scores=None,
                       weight_version=self._weight_version, weight_fingerprint=self.weight_fingerprint(),
                       step=step, shard=shard,
                       generate_seconds=time.perf_counter() - start, score_seconds=0.0)

    def rollout(self, queries: list[list[int]], step: int, shard: int, timeout_s: float = 300.0) -> Rollout:
        """generate, then score the texts with this shard's scorer."""
        if not self.scorers:
            raise ValueError("rollout() needs a scorer: pass scorers= to RolloutWorker, or call generate()")
        result = self.generate(queries, step, shard)
        start = time.perf_counter()
        result.scores = self._score(self._scorer(shard), result.texts, timeout_s)
        result.score_seconds = time.perf_counter() - start
        return result

    def ping(self) -> dict:
        """Where this worker runs, for the driver's start-up log and health checks."""
        return {**process_info(self.device), "weight_version": self._weight_version}

    def _checked_queries(self, queries: list[list[int]]) -> list[list[int]]:
        """Plain int lists (a numpy row would turn `query + response` into addition), length-checked."""
        if len(queries) == 0 or any(len(q) == 0 for q in queries):
            raise ValueError("generate() needs a non-empty list of non-empty queries")
        queries = [[int(t) for t in q] for q in queries]
        longest = max(len(q) for q in queries)
        if self.max_positions and longest + self.settings.response_max_tokens > self.max_positions:
            raise ValueError(
                f"query length {longest} + RolloutSettings.response_max_tokens "
                f"{self.settings.response_max_tokens} exceeds the policy's n_positions {self.max_positions}")
        return queries

    def _scorer(self, shard: int) -> Any:
        """This shard's scorer; a name is looked up once (Ray keeps the handle valid across restarts)."""
        i = shard % len(self.scorers)
        if isinstance(self.scorers[i], str):
            import ray

            self.scorers[i] = ray.get_actor(self.scorers[i])
        return self.scorers[i]

    @staticmethod
    def _score(scorer: Any, texts: list[str], timeout_s: float) -> list[float]:
        """Calls a local scorer directly, or a Ray actor handle with a timeout."""
        if hasattr(scorer.score, "remote"):
            import ray

            scores = ray.get(scorer.score.remote(texts), timeout=timeout_s)
        else:
            scores = scorer.score(texts)
        if len(scores) != len(texts):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(texts)} texts")
        return [float(s) for s in scores]
