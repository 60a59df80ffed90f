"""Rollout worker: samples responses to IMDB query openings with the current policy.

A plain Python class; the driver makes it an actor with ``ray.remote(...)(RolloutWorker)``.
Each PPO step the driver splits the step's queries into shards, one per worker; a worker
samples its shard as one batch (``actors.sampling``: a KV-cache loop where the model allows it,
transformers' ``generate`` otherwise) and (in ``rollout``) sends the prompts and responses to a reward server.
Weights arrive through ``load_weights`` (the driver passes them through Ray's object store).

Sampling is the reference recipe's (docs/recipe.md): top_k=0, top_p=1.0, temperature 1,
``max_new_tokens`` drawn uniformly from [response_min_tokens, response_max_tokens] per query,
EOS ends a response and stays in it. Sampling a batch, each row up to its own length, samples
the same distribution as one query at a time.

The reference notebook generated one query at a time, and cut responses with ``[-gen_len:]``,
which takes query tokens when EOS ends a response early. Here a shard is one batch, and each
response holds only the tokens sampled for it.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from transformers import (AutoModelForCausalLM, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                          TopPLogitsWarper)

from actors.sampling import InverseCdfSampling, Sampler, choose_sampler, eos_tuple, sample_responses
from modelhost.loading import load_model_and_tokenizer
from modelhost.process import process_info, resolve_device
from modelhost.weights import distinct_tensors, from_numpy, merge_lora, tied_duplicates, to_numpy

logger = logging.getLogger(__name__)

__all__ = ["DTYPES", "Rollout", "RolloutSettings", "RolloutWorker", "draw_lengths_and_seed", "left_pad", "split_texts",
           "InverseCdfSampling", "sampling_processors", "sample_responses"]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Rollout policy dtypes by name (``RolloutSettings.dtype``)."""


@dataclass
class RolloutSettings:
    """The rollout worker's own config (the learner's config tree hands it over)."""

    policy: str = "lvwerra/gpt2-imdb"
    """Hub id or local save_pretrained folder of the policy (tried as a local folder first)."""
    response_min_tokens: int = 4
    """Smallest per-query max_new_tokens; each query draws uniformly from [min, max] inclusive."""
    response_max_tokens: int = 15
    """Largest per-query max_new_tokens."""
    top_k: int = 0
    """0 disables top-k filtering (the recipe)."""
    top_p: float = 1.0
    """1.0 disables nucleus filtering (the recipe)."""
    temperature: float = 1.0
    """Sampling temperature (the recipe: 1). Log-probs are of the untempered policy, as in TRL."""
    seed: int = 0
    """Base seed; lengths and sampling are seeded from (seed, step, shard)."""
    device: str = "auto"
    """'auto': cuda if available else cpu; or any torch device string."""
    torch_threads: int = 1
    """torch.set_num_threads in the worker, so several actors on one node don't oversubscribe cores."""
    dtype: str = "float32"
    """The dtype of the rollout actors' policy copy: float32 (the reference), bfloat16 or float16 (half
    the memory and weight hand-over; the learner keeps fp32 weights and its own log-probs for PPO)."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype '{self.dtype}' must be one of {', '.join(DTYPES)}")
        if not 1 <= self.response_min_tokens <= self.response_max_tokens:
            raise ValueError(
                f"need 1 <= response_min_tokens <= response_max_tokens, got "
                f"{self.response_min_tokens} and {self.response_max_tokens}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or self.temperature <= 0.0:
            raise ValueError(f"need top_k >= 0, 0 < top_p <= 1 and temperature > 0, got top_k={self.top_k}, "
                             f"top_p={self.top_p}, temperature={self.temperature}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")


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
    prompts: list[str] = field(default_factory=list)
    """(B,) decode(query, skip_special_tokens=True): the prompt a reward source reads."""
    response_texts: list[str] = field(default_factory=list)
    """(B,) the response's text, so that prompts[i] + response_texts[i] == texts[i] (rollout.split_texts)."""
    source_scores: dict[str, list[float]] = field(default_factory=dict)
    """source name -> (B,) that reward source's scores; ``scores`` is their weighted sum ({} until scored)."""


def draw_lengths_and_seed(settings: RolloutSettings, step: int, shard: int, n: int) -> tuple[list[int], int]:
    """Per-query response lengths and the torch sampling seed, both from (seed, step, shard).

    Two independent child streams, so the torch seed does not depend on the shard size.
    """
    length_seq, torch_seq = np.random.SeedSequence([settings.seed, step, shard]).spawn(2)
    lengths = np.random.default_rng(length_seq).integers(
        settings.response_min_tokens, settings.response_max_tokens + 1, size=n)
    return [int(x) for x in lengths], int(torch_seq.generate_state(1, dtype=np.uint64)[0])


def split_texts(tokenizer: Any, queries: list[list[int]], responses: list[list[int]],
                texts: list[str]) -> tuple[list[str], list[str]]:
    """(prompts, response texts) with prompt + response == the whole text wherever the whole text
    starts with the decoded prompt (a reward source that joins them reads what the recipe's
    classifier read); elsewhere (a character split between query and response) each is decoded alone."""
    prompts = tokenizer.batch_decode(queries, skip_special_tokens=True)
    alone = None
    response_texts = []
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if text.startswith(prompt):
            response_texts.append(text[len(prompt):])
        else:
            alone = alone or tokenizer.batch_decode(responses, skip_special_tokens=True)
            response_texts.append(alone[i])
    return prompts, response_texts


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


def sampling_processors(settings: RolloutSettings, generator: torch.Generator) -> LogitsProcessorList:
    """The recipe's warpers in transformers' ``generate`` order (temperature, top-k, top-p), then the draw."""
    warpers = ([TemperatureLogitsWarper(settings.temperature)] if settings.temperature != 1.0 else []) + \
        ([TopKLogitsWarper(settings.top_k)] if settings.top_k > 0 else []) + \
        ([TopPLogitsWarper(settings.top_p)] if settings.top_p < 1.0 else [])
    return LogitsProcessorList([*warpers, InverseCdfSampling(generator)])


def end_ids(eos_id: int, model: Any) -> tuple[int, ...]:
    """The ids that end a response: the tokenizer's EOS first, then any other EOS the model's
    generation config names (chat models end a turn with their own token: Llama 3's
    ``<|eot_id|>``, Qwen's ``<|im_end|>``), as ``generate`` stops at any of them."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return tuple(dict.fromkeys([eos_id, *(() if configured is None else eos_tuple(configured))]))


class RolloutWorker:
    """Generates (and optionally scores) one shard of a PPO step's queries with the current policy."""

    def __init__(self, settings: RolloutSettings, scorers: Sequence[Any] = ()) -> None:
        """``scorers``: objects with ``score(prompts, responses)``, Ray actor handles of such, or the
        names of such Ray actors in this job's namespace. The driver passes names: Ray 2.60 logs an ERROR
        ("constructor arguments in the object store and max_restarts > 0") for a restartable
        actor whose constructor arguments hold actor handles (or anything over 100 KB); names
        are small plain strings, looked up at the first rollout."""
        torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.scorers = list(scorers)
        self.device = resolve_device(settings.device)
        self.model, self.tokenizer = load_model_and_tokenizer(AutoModelForCausalLM, settings.policy, "policy model")
        self.eos_id = int(self.tokenizer.eos_token_id)  # also the padding of left_pad, as in the recipe
        self.model.to(self.device, DTYPES[settings.dtype]).eval()
        self.end_ids = end_ids(self.eos_id, self.model)
        self.max_positions = int(getattr(self.model.config, "n_positions",
                                         getattr(self.model.config, "max_position_embeddings", 0)))
        self.sampler: Sampler = choose_sampler(self.model)
        self._tied = tied_duplicates(self.model)
        self._base: dict[str, torch.Tensor] | None = None  # LoRA: the adapted weights as first loaded
        self._weight_version = 0
        logger.info("rollout worker pid %d: %s on %s, %d torch threads", os.getpid(), settings.policy,
                    self.device, settings.torch_threads)

    @property
    def sampler_name(self) -> str:
        """Which sampling backend this worker's model got (``actors.sampling.choose_sampler``)."""
        return self.sampler.name

    @property
    def weight_version(self) -> int:
        return self._weight_version

    def load_weights(self, weights: dict[str, np.ndarray | torch.Tensor], version: int) -> int:
        """Copies a full set of policy weights in place (names as in the causal LM's state_dict),
        or applies LoRA adapters (``lora_up/<name>``, ``lora_down/<name>``: see ``_apply_adapters``)."""
        if any(name.startswith("lora_") for name in weights):
            return self._apply_adapters(weights, version)
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
                source = from_numpy(value, params[name].dtype)
                if source.shape != params[name].shape:
                    raise ValueError(f"load_weights: {name} has shape {tuple(source.shape)}, "
                                     f"the model's is {tuple(params[name].shape)}")
                params[name].copy_(source)
        self._weight_version = int(version)
        logger.debug("loaded weights version %d", version)
        return self._weight_version

    def _apply_adapters(self, weights: dict[str, np.ndarray | torch.Tensor], version: int) -> int:
        """Each adapted weight becomes base + up @ down (``modelhost.weights.merge_lora``), the base
        being this actor's own copy of the weight as first loaded (kept from the first adapters on);
        every other weight stays the base model's, which LoRA never changes."""
        params = self.model.state_dict()
        names = {name.split("/", 1)[1] for name in weights}
        unknown = sorted(names - set(params))
        if unknown or set(weights) != {f"lora_{p}/{n}" for n in names for p in ("up", "down")}:
            raise ValueError(f"load_weights: adapters for unknown weights {unknown[:5]}, or not in up/down pairs")
        if self._base is None:
            self._base = {name: params[name].detach().clone() for name in names}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only arrays from the object store, only read
            for name in names:
                up, down = torch.as_tensor(weights[f"lora_up/{name}"]), torch.as_tensor(weights[f"lora_down/{name}"])
                params[name].copy_(merge_lora(self._base[name], up, down))
        self._weight_version = int(version)
        return self._weight_version

    def weight_fingerprint(self) -> list[float]:
        """The fingerprint (actors.fingerprint) of the weights this worker holds now."""
        from actors.fingerprint import fingerprint

        return fingerprint(distinct_tensors(self.model).values())  # the learner's tensors, in its order

    def get_weights(self) -> dict[str, np.ndarray]:
        """The policy's state_dict as numpy copies (bfloat16 as ``to_numpy`` sends it), tied duplicates omitted."""
        return {name: to_numpy(t) for name, t in distinct_tensors(self.model).items()}

    def generate(self, queries: list[list[int]], step: int, shard: int) -> Rollout:
        """Samples one response per query as one batch (``self.sampler``); scores stay None."""
        queries = self._checked_queries(queries)
        start = time.perf_counter()
        lengths, torch_seed = draw_lengths_and_seed(self.settings, step, shard, len(queries))
        input_ids, attention_mask = left_pad(queries, self.eos_id)
        generator = torch.Generator(self.device).manual_seed(torch_seed)
        responses, logprobs = self.sampler.sample(
            input_ids.to(self.device), attention_mask.to(self.device), lengths, self.end_ids,
            sampling_processors(self.settings, generator))
        texts = self.tokenizer.batch_decode([q + r for q, r in zip(queries, responses)],
                                            skip_special_tokens=True)
        prompts, response_texts = split_texts(self.tokenizer, queries, responses, texts)
        return Rollout(queries=queries, responses=responses, texts=texts, prompts=prompts,
                       response_texts=response_texts,
                       logprobs=logprobs, scores=None,
                       weight_version=self._weight_version, weight_fingerprint=self.weight_fingerprint(),
                       step=step, shard=shard,
                       generate_seconds=time.perf_counter() - start, score_seconds=0.0)

    def rollout(self, queries: list[list[int]], step: int, shard: int, timeout_s: float = 300.0) -> Rollout:
        """generate, then score the (prompt, response) texts with this shard's scorer."""
        if not self.scorers:
            raise ValueError("rollout() needs a scorer: pass scorers= to RolloutWorker, or call generate()")
        result = self.generate(queries, step, shard)
        start = time.perf_counter()
        result.scores, result.source_scores = self._score(self._scorer(shard), result.prompts,
                                                          result.response_texts, timeout_s)
        result.score_seconds = time.perf_counter() - start
        return result

    def ping(self) -> dict:
        """Where this worker runs, for the driver's start-up log and health checks."""
        return {**process_info(self.device), "weight_version": self._weight_version, "sampler": self.sampler.name}

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
    def _score(scorer: Any, prompts: list[str], responses: list[str],
               timeout_s: float) -> tuple[list[float], dict[str, list[float]]]:
        """Calls a local scorer directly, or a Ray actor handle with a timeout. A scorer answers a
        list of rewards, or {"rewards": [...], "sources": {name: [...]}} (rewards.RewardServer)."""
        if hasattr(scorer.score, "remote"):
            import ray

            answer = ray.get(scorer.score.remote(prompts, responses), timeout=timeout_s)
        else:
            answer = scorer.score(prompts, responses)
        scores, sources = (answer["rewards"], answer.get("sources", {})) if isinstance(answer, dict) else (answer, {})
        if len(scores) != len(prompts):
            raise ValueError(f"scorer returned {len(scores)} scores for {len(prompts)} texts")
        return [float(s) for s in scores], {name: [float(v) for v in values] for name, values in sources.items()}
