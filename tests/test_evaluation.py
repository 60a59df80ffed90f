"""Evaluation during training (run.eval_every): the quick run (tests/conftest.py) scores 64
fixed held-out prompts with the weights after steps 0 and 5; eval/reward_mean reaches
stats.jsonl, TensorBoard, the Prometheus metrics and the reward figure. Off, it costs nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import DriverRun
from learner.config import ConfigError, parse_args
from learner.records.report import eval_series, plot_rewards

EVALUATED = [0, 5]  # steps whose weights are scored: 0, N, 2N, ... with --run.eval_every 5


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_eval_reward_is_logged_to_stats_tensorboard_and_prometheus(quick_run: DriverRun):
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    stats = quick_run.stats()
    rows = {s["step"]: s for s in stats if "eval/reward_mean" in s}
    assert sorted(rows) == EVALUATED
    for s in rows.values():
        assert -3 < s["eval/reward_mean"] < 3 and s["eval/reward_std"] > 0 and s["time/eval"] > 0
    assert all("time/eval" not in s for s in stats if s["step"] not in EVALUATED)
    lines = [line for line in quick_run.output.splitlines() if line.startswith("step ")]
    assert [i for i, line in enumerate(lines) if "  eval " in line] == EVALUATED
    acc = EventAccumulator(str(quick_run.run_dir / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    events = {e.step: e.value for e in acc.Scalars("eval/reward_mean")}
    assert events == pytest.approx({k: v["eval/reward_mean"] for k, v in rows.items()}, abs=1e-6)
    scraped = [line for line in quick_run.metrics.splitlines() if line.startswith("ray_ppo_eval_reward_mean{")]
    assert len(scraped) == 1 and 'run="quick"' in scraped[0], scraped
    prom = quick_run.prometheus
    if prom is not None and not prom.error and quick_run.live_at:
        assert prom.query('ray_ppo_eval_reward_mean{run="quick"}', at=quick_run.live_at)


def test_eval_points_go_on_the_reward_figure(tmp_path: Path):
    with (tmp_path / "stats.jsonl").open("w") as f:
        for step in range(6):
            row = {"step": step, "env/reward_mean": 0.1 * step, "env/reward_std": 0.5}
            if step % 2 == 0:
                row["eval/reward_mean"] = 0.05 * step
            f.write(json.dumps(row) + "\n")
    steps, means = eval_series(tmp_path)
    assert steps.tolist() == [0, 2, 4] and means.tolist() == pytest.approx([0.0, 0.1, 0.2])
    assert plot_rewards(tmp_path).read_bytes()[:4] == b"\x89PNG"


def test_evaluation_is_off_by_default_and_checked_when_on():
    cfg = parse_args([])
    assert cfg.run.eval_every == 0 and cfg.data.eval_split == "test" and cfg.data.eval_prompts == 256
    with pytest.raises(ConfigError, match=r"data.eval_prompts \(1\) is fewer than cluster.num_rollout_workers \(2\)"):
        parse_args(["--run.eval_every", "2", "--data.eval_prompts", "1"])
    with pytest.raises(ConfigError, match=r"run.eval_every \(-1\) must be >= 0"):
        parse_args(["--run.eval_every", "-1"])
