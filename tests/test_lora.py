"""LoRA through PEFT (--ppo.lora_rank): what trains, what is handed over, saved and exported."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from transformers import pipeline

from actors.rollout import RolloutSettings, RolloutWorker
from learner.config import PPOConfig
from learner.core.actor import LearnerActor
from modelhost.weights import distinct_tensors

from test_learner import _token_set_rewards

LORA = dict(lora_rank=8, lora_alpha=16.0, lora_target_modules="c_attn,c_proj,c_fc")
BATCH = ([[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]], [[20, 21], [22, 23, 24], [25], [26, 27]], [1.0, -1.0, 0.5, 0.0])


@pytest.fixture(scope="module")
def toy_policy(tmp_path_factory, shared_dir: Path) -> Path:
    """The tiny random GPT-2 of tests/conftest.py with weights drawn 15x wider (std 0.3): at
    GPT-2's std 0.02 its 32-wide embeddings give logits within about +-0.6 of each other, which
    no adapter behind the frozen, tied embedding can spread far enough to change what is sampled."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("toy-gpt2")
    tok = AutoTokenizer.from_pretrained(shared_dir / "reference" / "ppo-golden" / "case1" / "policy")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.3,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lora_raises_a_simple_reward(toy_policy: Path, seed: int):
    """The token-set reward of test_learner.py, learned through rank-8 adapters alone.

    Measured rise (mean reward of the last 5 of 20 steps - the first 5) over seeds 0-7 on an
    AMD EPYC: 0.633, 0.726, 0.776, 0.749, 0.851, 0.765, 0.714, 0.817 (mean 0.754, std 0.065,
    min 0.633). The threshold, 0.25, lies 7 std below the mean; a learner whose adapters do not
    train rises about 0 (measured: -0.01 to +0.005 where they could not move the logits)."""
    cfg = PPOConfig(learning_rate=1e-2, batch_size=32, mini_batch_size=16, ppo_epochs=4, init_kl_coef=0.01, **LORA)
    means = _token_set_rewards(LearnerActor(str(toy_policy), cfg, seed=seed, device="cpu", torch_threads=1), 20, seed)
    first, last = sum(means[:5]) / 5, sum(means[-5:]) / 5
    assert first < 0.2, means
    assert last > first + 0.25, f"reward did not rise: first {first:.3f}, last {last:.3f}; {means}"


def _lora_learner(policy: Path) -> LearnerActor:
    cfg = PPOConfig(learning_rate=1e-3, batch_size=4, mini_batch_size=2, ppo_epochs=2, **LORA)
    return LearnerActor(str(policy), cfg, seed=0, device="cpu", torch_threads=1)


def test_only_adapters_and_value_head_train_and_only_adapters_are_handed_over(policy_dir: Path):
    """After a step: every changed parameter is an adapter's or the value head's, the reference
    is the base (no second copy; KL 0 before any update), the hand-over is under 5% of the full
    weights (the stand-in policy: 6.9M weights), and a rollout actor that applies it to its own
    base holds the learner's policy."""
    learner = _lora_learner(policy_dir)
    assert learner.learner.ref_model is None
    before = {n: p.detach().clone() for n, p in learner.learner.model.named_parameters()}
    stats = learner.step(*BATCH)
    assert stats["objective/kl"] == 0.0  # the adapters start at zero: policy = reference
    changed = [n for n, p in learner.learner.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n or n.startswith("v_head.") for n in changed), changed
    assert any(n.startswith("v_head.") for n in changed) and any("lora_" in n for n in changed)
    assert learner.step(*BATCH)["objective/kl"] != 0.0  # the policy moved away from the reference

    payload = learner.get_weights()
    worker = RolloutWorker(RolloutSettings(policy=str(policy_dir)))
    full = sum(t.numel() for t in distinct_tensors(worker.model).values())
    assert sum(a.size for a in payload.values()) < 0.05 * full
    worker.load_weights(payload, 2)
    version, want = learner.weights_fingerprint()
    assert worker.weight_fingerprint() == want
    worker.load_weights(payload, 2)  # again: applied to the kept base, not on top of the last merge
    assert worker.weight_fingerprint() == want
    merged = learner.rollout_weights()
    held = distinct_tensors(worker.model)
    assert list(held) == list(merged) and all(torch.equal(held[n], merged[n]) for n in held)


def test_lora_checkpoint_holds_adapters_and_resumes_exactly_and_export_is_merged(tiny_policy: Path, tmp_path: Path):
    a = _lora_learner(tiny_policy)
    a.step(*BATCH)
    files = a.state_bytes()
    saved = load(files["learner.safetensors"])
    weights = [k for k in saved if k.startswith("model/")]
    assert weights and all("lora_" in k or k.startswith("model/v_head.") for k in weights), weights
    b = _lora_learner(tiny_policy)
    b.load_state_bytes(files)
    sa, sb = a.step(*BATCH), b.step(*BATCH)
    assert {k: v for k, v in sa.items() if not k.startswith("time/")} == \
        {k: v for k, v in sb.items() if not k.startswith("time/")}
    for (name, p), q in zip(a.learner.model.named_parameters(), b.learner.model.parameters()):
        assert torch.equal(p, q), name

    out = tmp_path / "tuned"
    out.mkdir()
    for name, data in a.export_policy().items():
        (out / name).write_bytes(data)
    gen = pipeline("text-generation", model=str(out), device="cpu")
    assert gen("This movie", max_new_tokens=3, do_sample=False)[0]["generated_text"].startswith("This movie")
    exported = distinct_tensors(gen.model)
    merged = a.rollout_weights()
    assert set(exported) == set(merged)
    assert all(torch.allclose(exported[n], merged[n], atol=1e-6) for n in merged)
