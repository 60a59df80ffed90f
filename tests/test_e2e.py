"""End-to-end: the real entry point on the stand-ins, with 2 rollout actors on embedded Ray."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers import pipeline

from conftest import DriverRun

# Each test may be the one that starts the shared quick run (about a minute alone, several
# minutes on a loaded 2-core machine), so each gets its limit.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_reward_rises(quick_run: DriverRun):
    """The quick run (10 steps, seed 0) raises the mean reward.

    Rise = mean of the last 3 steps - mean of the first 3, measured over seeds 0-4 on an AMD
    EPYC: 0.286, 0.510, 0.425, 0.207, 0.189 (mean 0.324, sd 0.140). Float results differ
    between CPUs, which at worst is another draw of the sampled tokens, so the seed spread bounds
    what another machine sees: the threshold, 0.05, lies one sd below the lowest seed and two
    below the mean. Learning in earnest is asserted over 20 steps below and in test_learner."""
    means = [s["env/reward_mean"] for s in quick_run.stats()]
    assert len(means) == 10
    first, last = sum(means[:3]) / 3, sum(means[-3:]) / 3
    assert last > first + 0.05, f"mean reward did not rise: first 3 steps {first:.3f}, last 3 {last:.3f}"


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


# ----------------------------------------------------------------------------- what users watch and keep

def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of one Prometheus metric."""
    out = []
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            labels, value = line.rsplit(" ", 1)
            out.append((labels, float(value)))
    return out


def test_ray_exports_the_project_metrics(quick_run: DriverRun):
    text = quick_run.metrics
    assert text, "no Prometheus text was scraped during the run"
    for name in ("ray_ppo_reward_mean", "ray_ppo_kl", "ray_ppo_kl_coef", "ray_ppo_policy_loss",
                 "ray_ppo_value_loss", "ray_ppo_clipfrac", "ray_ppo_samples_per_second",
                 "ray_ppo_tokens_per_second", "ray_ppo_phase_seconds", "ray_ppo_weight_version_lag",
                 "ray_ppo_reward_batch_size_count", "ray_ppo_eval_reward_mean", "ray_ppo_reward_source_mean"):
        assert _samples(text, name), f"{name} not exported"
    (labels, source_mean), = _samples(text, "ray_ppo_reward_source_mean")
    assert 'source="model"' in labels  # the recipe's one source, the classifier
    (_, reward), = _samples(text, "ray_ppo_reward_mean")
    assert -3 < reward < 3
    (_, beta), = _samples(text, "ray_ppo_kl_coef")
    assert 0.04 < beta < 0.06  # the quick config's init_kl_coef, barely moved
    (_, sps), = _samples(text, "ray_ppo_samples_per_second")
    assert sps > 0
    phases = {labels.split('phase="')[1].split('"')[0]: v for labels, v in _samples(text, "ray_ppo_phase_seconds")}
    assert {"broadcast", "generate", "score", "update"} <= set(phases) and all(v >= 0 for v in phases.values())
    lags = {labels.split('actor="')[1].split('"')[0]: v for labels, v in _samples(text, "ray_ppo_weight_version_lag")}
    assert lags == {"rollout-0": 0.0, "rollout-1": 0.0}
    # The reward actor merged the two rollout actors' requests: more texts per forward pass
    # than one actor's request (batch 64 / 2 actors = 32) holds.
    passes = sum(v for _, v in _samples(text, "ray_ppo_reward_batch_size_count"))
    texts = sum(v for _, v in _samples(text, "ray_ppo_reward_batch_size_sum"))
    assert passes >= 1 and texts / passes > 64 / 2, f"{texts:g} texts in {passes:g} reward passes: none merged"


STAT_KEYS = {
    "env/reward_mean", "env/reward_std", "objective/kl", "objective/kl_coef", "objective/entropy",
    "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/clipfrac", "ppo/policy/approxkl",
    "ppo/policy/policykl", "ppo/policy/entropy", "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac",
    "ppo/val/var_explained", "ppo/returns/mean", "ppo/returns/var", "time/broadcast", "time/generate",
    "time/score", "time/update", "time/step", "samples_per_second", "tokens_per_second",
    "rollout/weight_version", "rollout/version_lag",
}


def test_run_directory_is_complete(quick_run: DriverRun):
    import yaml

    d = quick_run.run_dir
    cfg = yaml.safe_load((d / "config.yaml").read_text())
    assert cfg["ppo"]["learning_rate"] == 1e-3 and cfg["cluster"]["num_rollout_workers"] == 2
    stats = quick_run.stats()
    assert [s["step"] for s in stats] == list(range(10))
    for s in stats:
        assert STAT_KEYS <= set(s), STAT_KEYS - set(s)
    png = (d / "reward.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (d / "policy" / "model.safetensors").is_file()
    assert (d / "checkpoints" / "step-000010" / "MANIFEST.json").is_file()


def test_before_after_table_rewards_are_the_reward_models(quick_run: DriverRun, reward_dir: Path):
    import csv

    from rewards.scorer import RewardSettings, SentimentScorer

    rows = list(csv.DictReader((quick_run.run_dir / "before_after.csv").open()))
    assert len(rows) == 16
    scorer = SentimentScorer(RewardSettings(model=str(reward_dir), torch_threads=1))
    for side in ("before", "after"):
        texts = [r["query"] + r[f"response {side}"] for r in rows]
        want = scorer.score(texts)
        got = [float(r[f"reward {side}"]) for r in rows]
        assert got == pytest.approx(want, abs=1e-4)
    md = (quick_run.run_dir / "before_after.md").read_text()
    assert "mean" in md and "median" in md


def test_overlapped_generation_still_learns(tmp_path: Path):
    """ppo.max_lag=1: each batch after the first is generated during the previous update, by
    weights one update old, and the PPO ratio is taken against them; it learns.

    Ten steps were too few to tell learning from noise on every CPU: the rise (mean of the last 3
    steps - mean of the first 3) over seeds 0-4 was 0.125, 0.296, 0.435, 0.193, 0.216 (mean 0.253,
    sd 0.119; the 0.125 of seed 0 is what failed the old 0.15 threshold on AMD). Over 20 steps it
    is 0.426, 0.657, 1.234, 0.535, 0.382 on the same machine (mean 0.647, sd 0.345), so the
    threshold, 0.2, lies well below the lowest seed (0.382) and holds on any CPU, while a run
    that does not learn (rise ~0 +- 0.1 from batch noise) fails it."""
    from conftest import run_driver

    run = run_driver(["--config", "configs/stand-in-quick.yaml", "--ppo.max_lag", "1", "--run.steps", "20",
                      "--run.checkpoint_every", "0", "--run.report_queries", "0"], tmp_path, "lag")
    assert run.returncode == 0, run.output[-3000:]
    stats = run.stats()
    assert [s["rollout/version_lag"] for s in stats] == [0] + [1] * 19
    first, last = sum(s["env/reward_mean"] for s in stats[:3]) / 3, sum(s["env/reward_mean"] for s in stats[-3:]) / 3
    assert last > first + 0.2, f"first 3 steps {first:.3f}, last 3 {last:.3f}"


def test_console_is_quiet_until_the_first_step(quick_run: DriverRun):
    """From start to the first step line: the driver's lines and warnings, no progress bar from
    an actor (transformers' "Loading weights") and no ERROR line when nothing is wrong."""
    head = quick_run.output.split("\nstep 1/")[0]
    assert "step 1/" in quick_run.output
    assert not re.search(r"it/s\]|%\|", head), head[-3000:]
    assert not re.search(r"\bERROR\b|^\[[^\]]* E \d+ \d+\]", head, re.M), head[-3000:]
    assert "plan: learner" in head and "Ray dashboard:" in head
