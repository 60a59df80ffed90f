"""Tests of actors/rollout.py on the stand-in policy (gpt2-imdb-mini), mostly without Ray.

Run: HF_HUB_OFFLINE=1 python -m pytest tests/test_rollout.py -q
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoTokenizer, BloomConfig, BloomForCausalLM, GPT2Config, GPT2LMHeadModel,
                          LogitsProcessorList)

from actors import Rollout, RolloutSettings, RolloutWorker
from actors.rollout import (InverseCdfSampling, draw_lengths_and_seed, left_pad, sample_responses,
                            sampling_processors)
from actors.sampling import CacheLoopSampler, GenerateSampler, cache_loop_unsupported
from modelhost.loading import ModelLoadError

OPENINGS = ["This movie was", "I", "The acting in this film is really", "Worst",
            "One of the best films of the", "My wife and I watched", "If you like horror", "Oh dear"]
EOS_BOOST_DIM = 0  # hidden dimension used to raise the EOS logit (see eos_prone_weights)


class WordCounter:
    """A real, tiny scorer: how often a word occurs in each text."""

    def __init__(self, word: str) -> None:
        self.word = word

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float((p + r).lower().split().count(self.word)) for p, r in zip(prompts, responses)]


def make_settings(policy: Path | str, **overrides) -> RolloutSettings:
    # Keep the test process's thread count: the worker sets it process-wide.
    return RolloutSettings(policy=str(policy), torch_threads=torch.get_num_threads(), **overrides)


def eos_prone_weights(worker: RolloutWorker, boost: float) -> dict[str, np.ndarray]:
    """The worker's weights with `boost` added to the EOS logit at every position.

    With tied embeddings, logit_v = h . wte[v]. Zeroing one hidden dimension d of wte except
    for EOS, and pinning the final hidden state's d to a constant (ln_f weight 0, bias c),
    adds wte[eos, d] * c to the EOS logit only.
    """
    weights = worker.get_weights()
    eos, d = worker.eos_id, EOS_BOOST_DIM
    weights["transformer.wte.weight"][:, d] = 0.0
    weights["transformer.wte.weight"][eos, d] = 10.0
    weights["transformer.ln_f.weight"][d] = 0.0
    weights["transformer.ln_f.bias"][d] = boost / 10.0
    return weights


@pytest.fixture(scope="module")
def worker(policy_dir: Path) -> RolloutWorker:
    """A worker on the original weights; tests that change weights build their own."""
    return RolloutWorker(make_settings(policy_dir))


@pytest.fixture(scope="module")
def eos_worker(policy_dir: Path) -> RolloutWorker:
    """A worker whose policy ends about half of its responses early with EOS."""
    w = RolloutWorker(make_settings(policy_dir))
    w.load_weights(eos_prone_weights(w, boost=5.0), version=3)
    return w


@pytest.fixture(scope="module")
def queries(worker: RolloutWorker) -> list[list[int]]:
    """Real openings of different lengths (1 to 7 tokens), twice over: 16 queries."""
    return [worker.tokenizer(text)["input_ids"] for text in OPENINGS] * 2


def test_responses_are_cut_to_drawn_length_and_first_eos(eos_worker: RolloutWorker, queries):
    settings, eos = eos_worker.settings, eos_worker.eos_id
    ended_early = 0
    for step in range(4):
        out = eos_worker.generate(queries, step=step, shard=0)
        drawn, _ = draw_lengths_and_seed(settings, step, 0, len(queries))
        assert [len(lp) for lp in out.logprobs] == [len(r) for r in out.responses]
        for response, length in zip(out.responses, drawn):
            assert settings.response_min_tokens <= length <= settings.response_max_tokens
            assert 1 <= len(response) <= length
            assert eos not in response[:-1], "EOS must end the response"
            assert len(response) == length or response[-1] == eos, "only EOS may end a response early"
            ended_early += len(response) < length
    assert ended_early > 0, "the EOS-prone policy should end some responses early"


def test_sampling_loop_takes_the_tokens_generate_takes(eos_worker: RolloutWorker, queries):
    """With greedy picks (no sampler), the loop that drops finished rows from the batch and the
    KV cache gives what transformers' ``generate`` gives when every row runs to the longest
    drawn length and is cut afterwards: the same tokens, left padding and cache kept in step."""
    lengths, _ = draw_lengths_and_seed(eos_worker.settings, 5, 2, len(queries))
    input_ids, mask = left_pad(queries, eos_worker.eos_id)
    eos = eos_worker.eos_id
    responses, logprobs = sample_responses(eos_worker.model, input_ids, mask, lengths, eos, LogitsProcessorList())
    with torch.no_grad():
        generated = eos_worker.model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lengths), min_length=0,
            eos_token_id=eos, pad_token_id=eos, repetition_penalty=1.0, no_repeat_ngram_size=0,
            output_logits=True, return_dict_in_generate=True)
    width = input_ids.shape[1]
    expected_logp = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in generated.logits], dim=1)  # (B, T, V)
    assert [mask[i].tolist() for i in range(len(queries))] == [[0] * (width - len(q)) + [1] * len(q) for q in queries]
    ended_early = 0
    for i, (row, length, response) in enumerate(zip(generated.sequences[:, width:].tolist(), lengths, responses)):
        head = row[:length]
        expected = head[:head.index(eos) + 1] if eos in head else head
        assert response == expected
        at = expected_logp[i, torch.arange(len(response)), torch.tensor(response)]
        assert np.allclose(logprobs[i], at.numpy(), atol=1e-5)
        ended_early += len(response) < length
    assert ended_early > 0 and len(set(map(len, responses))) > 2, "some rows must leave the batch early"


def test_backends_draw_the_same_tokens_from_the_same_seed(eos_worker: RolloutWorker, queries, monkeypatch):
    """Both backends draw one uniform number per row still sampling and step, in row order, so
    from the same seed they give the same tokens and log-probs, also after rows have ended at
    different steps (the loop drops them from the batch, generate keeps them)."""
    assert eos_worker.sampler_name == "cache-loop"
    by_loop = [eos_worker.generate(queries, step, 0) for step in range(3)]
    monkeypatch.setattr(eos_worker, "sampler", GenerateSampler(eos_worker.model))
    ends = set()
    for step, expected in enumerate(by_loop):
        out = eos_worker.generate(queries, step, 0)
        assert out.responses == expected.responses
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(out.logprobs, expected.logprobs))
        ends |= {(len(r), r[-1] == eos_worker.eos_id) for r in out.responses}
    assert {n for n, _ in ends} >= {1, 2, 3, 4} and (True in {e for _, e in ends}), "rows must end at many steps"


def test_any_end_id_of_the_generation_config_ends_a_response(worker: RolloutWorker, queries, monkeypatch):
    """A chat model ends a turn with a token of its own besides the tokenizer's EOS (its
    generation config lists both): either one ends a response, in both backends alike."""
    from actors.rollout import end_ids

    eos = worker.eos_id
    monkeypatch.setattr(worker.model.generation_config, "eos_token_id", [eos, 11, eos])
    assert end_ids(eos, worker.model) == (eos, 11)
    monkeypatch.setattr(worker.model.generation_config, "eos_token_id", None)
    assert end_ids(eos, worker.model) == (eos,)
    # Make the commonest response token an end id, so that many rows end early by it.
    tokens = [t for step in range(2) for r in worker.generate(queries, step, 0).responses for t in r[:-1]]
    turn_end = max(set(tokens), key=tokens.count)
    monkeypatch.setattr(worker, "end_ids", (eos, turn_end))
    by_loop = [worker.generate(queries, step, 0) for step in range(2)]
    ended_by_turn = 0
    for step, out in enumerate(by_loop):
        drawn, _ = draw_lengths_and_seed(worker.settings, step, 0, len(queries))
        for response, length in zip(out.responses, drawn):
            assert not {eos, turn_end} & set(response[:-1]), "an end id must end the response"
            assert len(response) == length or response[-1] in (eos, turn_end)
            ended_by_turn += len(response) < length and response[-1] == turn_end
    assert ended_by_turn > 0
    monkeypatch.setattr(worker, "sampler", GenerateSampler(worker.model))
    for step, expected in enumerate(by_loop):
        assert worker.generate(queries, step, 0).responses == expected.responses


def tiny_lm(vocab: int, seed: int) -> GPT2LMHeadModel:
    """A 1-layer random GPT-2 with large initial weights, so its next-token distributions are far
    from uniform and depend on the position."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=16, n_layer=1, n_head=2, initializer_range=0.5,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval()


def two_token_law(model: GPT2LMHeadModel, prompt: list[int], eos: int, temperature: float, top_k: int
                  ) -> tuple[dict[tuple[int, ...], float], dict[tuple[int, ...], float]]:
    """The exact law of a two-token response (EOS first ends it) to ``prompt`` alone, from the
    logits divided by the temperature and cut to the top k; and the raw log-prob of each
    response's last token given its prefix, the log-prob a backend must report."""
    def step(ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].double()  # (V,)
        scores = logits / temperature
        if top_k:
            scores = scores.masked_fill(scores < scores.topk(top_k).values[-1], float("-inf"))
        return torch.softmax(scores, -1), torch.log_softmax(logits, -1)

    law, logp = {}, {}
    first, first_logp = step(prompt)
    for a in range(len(first)):
        if a == eos:
            law[(a,)], logp[(a,)] = float(first[a]), float(first_logp[a])
            continue
        second, second_logp = step(prompt + [a])
        logp[(a,)] = float(first_logp[a])
        for b in range(len(second)):
            law[(a, b)], logp[(a, b)] = float(first[a] * second[b]), float(second_logp[b])
    return law, logp


def chi_square_and_bound(counts: dict, law: dict, n: int) -> tuple[float, float]:
    """Pearson's statistic of ``counts`` (n draws) against ``law``, outcomes expected fewer than
    5 times pooled, and its 1 - 1e-6 quantile (Wilson-Hilferty) under the law."""
    expected = {k: n * p for k, p in law.items() if p > 0}
    small = [k for k, e in expected.items() if e < 5]
    bins = [([k], expected[k]) for k in expected if k not in small] + ([(small, sum(expected[k] for k in small))]
                                                                       if small else [])
    stat = sum((sum(counts.get(k, 0) for k in keys) - e) ** 2 / e for keys, e in bins)
    df = len(bins) - 1
    z = 4.753  # the standard normal's 1 - 1e-6 quantile
    return stat, df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("temperature, top_k", [(1.0, 0), (0.6, 3)])
def test_both_backends_sample_the_policy_distribution(temperature: float, top_k: int):
    """Each backend, with its own seed, draws the first two response tokens of 6000 rows per
    prompt (one prompt left-padded): the frequencies pass a chi-square test against the law
    computed from unpadded forward passes with the sampling settings applied by hand, tokens
    outside the top k are never drawn, and every log-prob is the raw policy's."""
    vocab, eos, n = 8, 0, 6000
    model = tiny_lm(vocab, seed=3)
    prompts = [[3, 1, 4, 1], [5]]
    laws = [two_token_law(model, p, eos, temperature, top_k) for p in prompts]
    input_ids, mask = left_pad([p for p in prompts for _ in range(n)], pad_id=eos)
    settings = make_settings("unused", temperature=temperature, top_k=top_k)
    for seed, sampler in enumerate([CacheLoopSampler(model), GenerateSampler(model)]):
        processors = sampling_processors(settings, torch.Generator().manual_seed(seed))
        responses, logprobs = sampler.sample(input_ids, mask, [2] * len(input_ids), eos, processors)
        for i, (law, logp) in enumerate(laws):
            rows = range(i * n, (i + 1) * n)
            drawn = [tuple(responses[r]) for r in rows]
            assert all(law.get(d, 0.0) > 0 for d in drawn), f"{sampler.name}: a token of probability 0 was drawn"
            for r, d in zip(rows, drawn):
                assert np.allclose(logprobs[r], [logp[d[:t + 1]] for t in range(len(d))], atol=1e-5), sampler.name
            counts: dict[tuple[int, ...], int] = {}
            for d in drawn:
                counts[d] = counts.get(d, 0) + 1
            stat, bound = chi_square_and_bound(counts, law, n)
            assert stat < bound, f"{sampler.name}, prompt {prompts[i]}: chi-square {stat:.1f} >= {bound:.1f}"


@pytest.fixture(scope="module")
def bloom_policy(tmp_path_factory, policy_dir: Path) -> Path:
    """A tiny random BLOOM with the stand-in's tokenizer: ALiBi instead of position embeddings, so
    its forward takes no ``position_ids`` and the KV-cache loop cannot drive it. Its EOS logit is
    raised (as eos_prone_weights does) so that responses end early."""
    folder = tmp_path_factory.mktemp("tiny-bloom")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    eos = tokenizer.eos_token_id
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=16, n_layer=1, n_head=2,
                                         bos_token_id=eos, eos_token_id=eos))
    with torch.no_grad():
        model.transformer.word_embeddings.weight[:, EOS_BOOST_DIM] = 0.0  # tied with the output embeddings
        model.transformer.word_embeddings.weight[eos, EOS_BOOST_DIM] = 10.0
        model.transformer.ln_f.weight[EOS_BOOST_DIM] = 0.0
        model.transformer.ln_f.bias[EOS_BOOST_DIM] = 0.8
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_model_the_loop_cannot_drive_falls_back_to_generate(bloom_policy: Path, worker: RolloutWorker, queries):
    assert cache_loop_unsupported(worker.model) is None and worker.ping()["sampler"] == "cache-loop"
    w = RolloutWorker(make_settings(bloom_policy))
    assert cache_loop_unsupported(w.model) == "its forward takes no position_ids"
    assert w.sampler_name == "generate" and w.ping()["sampler"] == "generate"
    eos, ended_early = w.eos_id, 0
    for step in range(2):
        out = w.generate(queries, step=step, shard=0)
        drawn, _ = draw_lengths_and_seed(w.settings, step, 0, len(queries))
        for query, response, logprobs, length in zip(out.queries, out.responses, out.logprobs, drawn):
            assert 1 <= len(response) <= length and eos not in response[:-1]
            assert len(response) == length or response[-1] == eos
            ended_early += len(response) < length
            with torch.no_grad():  # left padding must not shift ALiBi's positions either
                logits = w.model(input_ids=torch.tensor([query + response])).logits[0].float()  # (Lq + Lr, V)
            expected = torch.log_softmax(logits[len(query) - 1:-1], dim=-1).gather(
                -1, torch.tensor(response)[:, None]).squeeze(-1)
            assert np.allclose(logprobs, expected.numpy(), atol=1e-4)
        assert out.texts == w.tokenizer.batch_decode([q + r for q, r in zip(queries, out.responses)],
                                                     skip_special_tokens=True)
    assert ended_early > 0


def test_forced_eos_gives_eos_only_responses_not_query_tokens(policy_dir: Path, queries):
    """The notebook's [-gen_len:] cut returned query tokens when EOS came first; here it is [EOS]."""
    w = RolloutWorker(make_settings(policy_dir))
    w.load_weights(eos_prone_weights(w, boost=100.0), version=1)
    out = w.generate(queries, step=0, shard=0)
    assert out.responses == [[w.eos_id]] * len(queries)
    assert out.texts == w.tokenizer.batch_decode(queries, skip_special_tokens=True)
    assert np.allclose([lp[0] for lp in out.logprobs], 0.0, atol=1e-4)


def test_same_seed_step_shard_gives_same_tokens(worker: RolloutWorker, queries, policy_dir: Path):
    first = worker.generate(queries, step=3, shard=1)
    again = RolloutWorker(make_settings(policy_dir)).generate(queries, step=3, shard=1)
    assert again.responses == first.responses
    assert again.logprobs == first.logprobs
    as_arrays = worker.generate([np.array(q, dtype=np.int64) for q in queries], step=3, shard=1)
    assert as_arrays.queries == queries and as_arrays.responses == first.responses
    assert worker.generate(queries, step=4, shard=1).responses != first.responses
    assert worker.generate(queries, step=3, shard=2).responses != first.responses


def test_generate_backend_ignores_the_model_generation_config_file(worker: RolloutWorker, queries, policy_dir: Path,
                                                                  tmp_path: Path, monkeypatch):
    """Settings in generation_config.json (penalties, min length, top-k) must not change what
    ``generate`` samples: the rollout's sampling is RolloutSettings' alone."""
    folder = tmp_path / "policy"
    shutil.copytree(policy_dir, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, min_length=40, top_k=3, temperature=0.3)
    (folder / "generation_config.json").write_text(json.dumps(config))
    tampered = RolloutWorker(make_settings(folder))
    monkeypatch.setattr(tampered, "sampler", GenerateSampler(tampered.model))
    assert tampered.generate(queries, 7, 0).responses == worker.generate(queries, 7, 0).responses
    assert tampered.model.generation_config.repetition_penalty == 5.0  # the model's own config is left as it was


def test_sampling_settings_change_what_is_sampled(worker: RolloutWorker, queries, policy_dir: Path):
    """top_k=1 is greedy decoding (for either backend); the recipe's settings are not."""
    greedy_worker = RolloutWorker(make_settings(policy_dir, top_k=1))
    lengths, _ = draw_lengths_and_seed(worker.settings, 7, 0, len(queries))
    input_ids, mask = left_pad(queries, worker.eos_id)
    greedy, _ = sample_responses(worker.model, input_ids, mask, lengths, worker.eos_id, LogitsProcessorList())
    assert greedy_worker.generate(queries, 7, 0).responses == greedy
    greedy_worker.sampler = GenerateSampler(greedy_worker.model)
    assert greedy_worker.generate(queries, 7, 0).responses == greedy
    assert worker.generate(queries, 7, 0).responses != greedy


def test_logprobs_equal_unpadded_forward_pass(eos_worker: RolloutWorker, queries):
    """Left padding must not shift positions: compare with each query + response alone."""
    out = eos_worker.generate(queries, step=1, shard=0)
    for query, response, logprobs in zip(out.queries, out.responses, out.logprobs):
        ids = torch.tensor([query + response])  # (1, Lq + Lr), no padding
        with torch.no_grad():
            logits = eos_worker.model(input_ids=ids).logits[0].float()  # (Lq + Lr, V)
        # Position t predicts token t + 1: the response tokens are predicted from Lq - 1 on.
        expected = torch.log_softmax(logits[len(query) - 1:-1], dim=-1).gather(
            -1, torch.tensor(response)[:, None]).squeeze(-1)
        assert np.allclose(logprobs, expected.numpy(), atol=1e-4)


def test_load_weights_round_trip_and_version(policy_dir: Path, queries):
    w = RolloutWorker(make_settings(policy_dir))
    rng = np.random.default_rng(0)
    perturbed = {k: v + rng.normal(0, 0.01, v.shape).astype(v.dtype) for k, v in w.get_weights().items()}
    assert "lm_head.weight" not in perturbed  # tied to transformer.wte.weight
    for value in perturbed.values():
        value.flags.writeable = False  # as arrays arrive from Ray's object store
    assert w.load_weights(perturbed, version=7) == 7
    loaded = w.get_weights()
    assert loaded.keys() == perturbed.keys()
    assert all(np.array_equal(loaded[k], perturbed[k]) for k in perturbed)
    assert torch.equal(w.model.lm_head.weight, w.model.transformer.wte.weight)  # tie kept
    assert w.weight_version == 7
    assert w.generate(queries, step=0, shard=0).weight_version == 7


def test_load_weights_rejects_unknown_and_missing_names(worker: RolloutWorker):
    weights = worker.get_weights()
    with pytest.raises(ValueError, match="unknown names \\['not.a.weight'\\]"):
        worker.load_weights({**weights, "not.a.weight": np.zeros(1)}, version=1)
    del weights["transformer.h.0.ln_1.bias"]
    with pytest.raises(ValueError, match="missing names \\['transformer.h.0.ln_1.bias'\\]"):
        worker.load_weights(weights, version=1)
    assert worker.weight_version == 0


def test_bad_queries_and_settings_raise(worker: RolloutWorker):
    with pytest.raises(ValueError, match="non-empty"):
        worker.generate([], step=0, shard=0)
    with pytest.raises(ValueError, match="non-empty"):
        worker.generate([[5, 6], []], step=0, shard=0)
    with pytest.raises(ValueError, match="response_max_tokens 15 exceeds the policy's n_positions 256"):
        worker.generate([[5] * 250], step=0, shard=0)
    with pytest.raises(ValueError, match="response_min_tokens"):
        RolloutSettings(response_min_tokens=9, response_max_tokens=4)


def test_unreachable_hub_id_gives_one_line_error():
    with pytest.raises(ModelLoadError, match="policy model .* not a local folder .* pass a local save_pretrained folder") as info:
        RolloutWorker(make_settings("no-such-org/no-such-model"))
    assert "\n" not in str(info.value)


def test_rollout_scores_with_local_scorers(policy_dir: Path, queries):
    scorers = [WordCounter("the"), WordCounter("a")]
    w = RolloutWorker(make_settings(policy_dir), scorers=scorers)
    for shard in (0, 1, 2):
        out = w.rollout(queries, step=2, shard=shard)
        assert isinstance(out, Rollout)
        assert [p + r for p, r in zip(out.prompts, out.response_texts)] == out.texts
        assert out.scores == scorers[shard % 2].score(out.prompts, out.response_texts)
        assert out.score_seconds >= 0.0 and out.generate_seconds > 0.0
    assert w.generate(queries, step=2, shard=0).scores is None
    with pytest.raises(ValueError, match="needs a scorer"):
        RolloutWorker(make_settings(policy_dir)).rollout(queries, step=0, shard=0)


def test_rollout_scores_with_ray_actor_handle(ray_local, worker: RolloutWorker, queries):
    """The worker as a Ray actor, scoring through another actor's handle, as the driver spawns them."""

    class RemoteWordCounter:
        # Defined inside the test so Ray ships it by value: Ray's workers cannot import this test module.
        def score(self, prompts: list[str], responses: list[str]) -> list[float]:
            return [float((p + r).lower().split().count("the")) for p, r in zip(prompts, responses)]

    scorer = ray_local.remote(num_cpus=0)(RemoteWordCounter).remote()
    remote_worker = ray_local.remote(num_cpus=0)(RolloutWorker).remote(worker.settings, [scorer])
    out = ray_local.get(remote_worker.rollout.remote(queries, 6, 0, 60.0), timeout=120)
    assert out.responses == worker.generate(queries, step=6, shard=0).responses
    assert out.scores == WordCounter("the").score(out.prompts, out.response_texts)
    info = ray_local.get(remote_worker.ping.remote(), timeout=60)
    assert info["node_id"] == ray_local.get_runtime_context().get_node_id()
    assert info["weight_version"] == 0 and info["device"] == "cpu"
    # The in-process worker reaches the same scorer handle through ray.get with a timeout.
    local = RolloutWorker(worker.settings, scorers=[scorer]).rollout(queries, step=6, shard=0, timeout_s=60.0)
    assert local.scores == out.scores


def test_inverse_cdf_sampling_draws_from_the_softmax():
    """200k draws per row against softmax(scores): every frequency within 5 standard errors,
    zero-probability entries (-inf, as top-k leaves them) never drawn, and the returned scores
    make the draw the only finite entry, so generate's greedy pick takes it."""
    scores = torch.tensor([[1.0, 2.0, 0.5, -1.0, float("-inf")], [0.0, 0.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(scores, dim=-1)
    sampler = InverseCdfSampling(torch.Generator().manual_seed(0))
    n = 200_000
    counts = torch.zeros(2, 5)
    for _ in range(n // 1000):
        out = sampler(None, scores.repeat_interleave(1000, dim=0))
        assert torch.isfinite(out).sum(dim=1).eq(1).all()
        drawn = out.argmax(dim=-1).view(2, 1000)
        counts += torch.stack([torch.bincount(d, minlength=5) for d in drawn]).float()
    freq = counts / n
    se = (probs * (1 - probs) / n).sqrt()
    assert ((freq - probs).abs() <= 5 * se + 1e-9).all(), (freq, probs)
    assert counts[0, 4] == 0


def test_inverse_cdf_sampling_follows_top_k_and_its_seed(policy_dir: Path):
    settings = make_settings(policy_dir)
    scores = torch.randn(64, 50)
    with_top_k = sampling_processors(dataclasses.replace(settings, top_k=3), torch.Generator().manual_seed(1))
    picked = with_top_k(None, scores).argmax(dim=-1)
    assert (scores.gather(1, picked[:, None]) >= scores.topk(3, dim=-1).values[:, -1:]).all()
    draw = lambda seed: sampling_processors(settings, torch.Generator().manual_seed(seed))(None, scores).argmax(-1)  # noqa: E731
    assert torch.equal(draw(7), draw(7)) and not torch.equal(draw(7), draw(8))
