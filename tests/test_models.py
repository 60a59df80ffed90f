"""Any causal LM as the policy: tiny random Llama, Qwen2 (tied embeddings), GPT-NeoX and Gemma 2
(logits soft-capped after the head, sliding-window layers) models, built here with
``save_pretrained`` and the stand-in tokenizer (nothing downloaded).

For each: the rollout worker's sampled tokens and log-probs agree with the learner's log-probs
for the same tokens (after every weight hand-over), the KV-cache loop takes the tokens
``generate`` takes under greedy picks and both backends draw the same tokens from one seed,
and a 3-step PPO run (learner, rollout worker and a scorer in this process, the weights handed
over as the driver does) completes and exports a policy transformers loads.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, GPTNeoXConfig,
                          GPTNeoXForCausalLM, LlamaConfig,
                          LlamaForCausalLM, LogitsProcessorList, Qwen2Config, Qwen2ForCausalLM)

from actors import RolloutSettings, RolloutWorker
from actors.fingerprint import same
from actors.rollout import draw_lengths_and_seed, left_pad, sample_responses
from actors.sampling import GenerateSampler, cache_loop_unsupported
from learner.config import PPOConfig
from learner.core.actor import LearnerActor
from learner.core.forward import pad_batch

OPENINGS = ["This movie was", "I", "The acting in this film is really", "Worst",
            "One of the best films of the", "My wife and I watched", "If you like horror", "Oh dear"]
SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _llama(vocab: int, eos: int):
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, num_key_value_heads=2, bos_token_id=eos, eos_token_id=eos,
                                        pad_token_id=eos, tie_word_embeddings=False, **SIZES))


def _qwen2(vocab: int, eos: int):
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, num_key_value_heads=2, bos_token_id=eos, eos_token_id=eos,
                                        pad_token_id=eos, tie_word_embeddings=True, **SIZES))


def _gpt_neox(vocab: int, eos: int):
    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, rotary_pct=0.5, bos_token_id=eos, eos_token_id=eos,
                                            pad_token_id=eos, tie_word_embeddings=False, **SIZES))


def _gemma2(vocab: int, eos: int):
    """Gemma 2 caps its logits after the LM head (final_logit_softcapping) and scales its embeddings."""
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, num_key_value_heads=2, head_dim=8, bos_token_id=eos,
                                          eos_token_id=eos, pad_token_id=eos, final_logit_softcapping=5.0,
                                          sliding_window=4, **SIZES))


ARCHITECTURES = {"llama": _llama, "qwen2": _qwen2, "gpt-neox": _gpt_neox, "gemma2": _gemma2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models: one torch thread is fastest, and a busy machine's other threads do not stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def policy(request, tmp_path_factory, policy_dir: Path) -> Path:
    """A tiny random model of one architecture, saved with the stand-in's tokenizer."""
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    torch.manual_seed(0)
    ARCHITECTURES[request.param](len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _worker(policy: Path, **overrides) -> RolloutWorker:
    return RolloutWorker(RolloutSettings(policy=str(policy), torch_threads=torch.get_num_threads(), **overrides))


def _queries(worker: RolloutWorker) -> list[list[int]]:
    """Openings of 1 to 7 tokens, twice over: 16 queries, left-padded differently."""
    return [worker.tokenizer(text, add_special_tokens=False)["input_ids"] for text in OPENINGS] * 2


class LengthScorer:
    """A scorer in this process: longer texts score higher."""

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [len(p + r) / 50 for p, r in zip(prompts, responses)]


def test_the_kv_cache_loop_takes_the_tokens_generate_takes(policy: Path):
    worker = _worker(policy)
    assert cache_loop_unsupported(worker.model) is None and worker.sampler_name == "cache-loop"
    queries, eos = _queries(worker), worker.eos_id
    lengths, _ = draw_lengths_and_seed(worker.settings, 5, 2, len(queries))
    input_ids, mask = left_pad(queries, eos)
    responses, logprobs = sample_responses(worker.model, input_ids, mask, lengths, eos, LogitsProcessorList())
    with torch.no_grad():
        generated = worker.model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, max_new_tokens=max(lengths), min_length=0,
            eos_token_id=eos, pad_token_id=eos, output_logits=True, return_dict_in_generate=True)
    width = input_ids.shape[1]
    expected_logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in generated.logits], dim=1)  # (B, T, V)
    for i, (row, length, response) in enumerate(zip(generated.sequences[:, width:].tolist(), lengths, responses)):
        head = row[:length]
        assert response == (head[:head.index(eos) + 1] if eos in head else head)
        at = expected_logp[i, torch.arange(len(response)), torch.tensor(response)]
        assert np.allclose(logprobs[i], at.numpy(), atol=1e-5)
    assert len(set(map(len, responses))) > 2  # rows left the loop's batch at different steps
    # Sampling: both backends draw the same tokens from the same seed.
    by_loop = worker.generate(queries, 1, 0)
    worker.sampler = GenerateSampler(worker.model)
    by_generate = worker.generate(queries, 1, 0)
    assert by_generate.responses == by_loop.responses
    assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(by_generate.logprobs, by_loop.logprobs))


def test_the_learner_applies_the_head_alone_only_where_that_gives_the_models_logits(policy: Path):
    from learner.core.forward import plain_head

    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32)
    assert plain_head(model) == (model.config.model_type != "gemma2")


def test_three_ppo_steps_with_rollout_and_learner_log_probs_agreeing(policy: Path, tmp_path: Path):
    """The driver's loop in one process: hand the learner's weights over (tied ones once), check
    the worker holds them, sample and score, compare the worker's log-probs with the learner's
    for the same tokens, step. Three times; then the tuned policy loads in transformers."""
    cfg = PPOConfig(learning_rate=1e-3, batch_size=16, mini_batch_size=8, ppo_epochs=2, init_kl_coef=0.05)
    learner = LearnerActor(str(policy), cfg, seed=0, device="cpu", torch_threads=1)
    worker = _worker(policy)
    worker.scorers = [LengthScorer()]
    queries = _queries(worker)
    for step in range(3):
        version = worker.load_weights(learner.get_weights(), learner.version)
        assert version == step and same(worker.weight_fingerprint(), learner.weights_fingerprint()[1])
        out = worker.rollout(queries, step, 0)
        batch = pad_batch(out.queries, out.responses, learner.pad_id)
        theirs = learner.policy_outputs(batch).logp  # (B, T), 0 off the response positions
        for i, mine in enumerate(out.logprobs):
            assert np.allclose(mine, theirs[i][batch.mask[i].bool()].numpy(), atol=1e-4), f"step {step} row {i}"
        stats = learner.step(out.queries, out.responses, out.scores)
        assert all(np.isfinite(v) for v in stats.values() if isinstance(v, float)), stats
    assert learner.version == 3
    for name, data in learner.export_policy().items():
        (tmp_path / name).write_bytes(data)
    tuned = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    trained = learner.learner.model.pretrained_model.state_dict()
    assert all(torch.equal(t, trained[k]) for k, t in tuned.state_dict().items())
