"""End-to-end: the real entry point on the stand-ins, with 2 rollout actors on embedded Ray."""
from __future__ import annotations

from pathlib import Path

from transformers import pipeline

from conftest import DriverRun


def test_reward_rises(quick_run: DriverRun):
    means = [s["env/reward_mean"] for s in quick_run.stats()]
    assert len(means) == 10
    first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
    assert last > first + 0.15, f"mean reward did not rise clearly: first 3 steps {first:.3f}, last 3 {last:.3f}"


def test_prints_dashboard_and_a_line_per_step(quick_run: DriverRun):
    out = quick_run.output
    assert "Ray dashboard: http://127.0.0.1:" in out
    assert sum(line.startswith("step ") for line in out.splitlines()) == 10
    assert "tuned policy saved to" in out


def test_full_batches_from_both_actors_with_current_weights(quick_run: DriverRun):
    for s in quick_run.stats():
        assert s["rollout/version_lag"] == 0
        assert s["rollout/weight_version"] == s["step"]  # weights after `step` updates generated step `step`
        assert s["tokens/responses_len_mean"] > 0


def test_tuned_policy_loads_in_a_pipeline(quick_run: DriverRun):
    folder = quick_run.run_dir / "policy"
    assert (folder / "value_head.safetensors").is_file()
    text = pipeline("text-generation", model=str(folder), device="cpu")("This film", max_new_tokens=4)
    assert text[0]["generated_text"].startswith("This film")
