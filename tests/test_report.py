"""Tests of learner/report.py on a small but real run directory built from the stand-ins.

Run: HF_HUB_OFFLINE=1 python -m pytest tests/test_report.py -q
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from learner.config import Config
from learner.report import main
from learner.records.report import (COLUMNS, reward_axis, TABLE_MD, held_out_queries, histogram_grid, load_run_config, make_report,
                            md_cell, plot_rewards, reward_series)

REPO = Path(__file__).resolve().parents[1]
N_QUERIES = 8
SEED = 3
STEPS, BATCH = 6, 16


def write_logs(run_dir: Path, rollouts: bool = True) -> None:
    """A few steps of random rewards whose mean drifts upwards, as stats.jsonl (+ rollouts.jsonl)."""
    rng = np.random.default_rng(0)
    with (run_dir / "stats.jsonl").open("w") as stats, (run_dir / "rollouts.jsonl").open("w") as roll:
        for step in range(STEPS):
            scores = rng.normal(-0.5 + 0.3 * step, 0.6, size=BATCH)
            stats.write(json.dumps({"step": step, "env/reward_mean": float(scores.mean()),
                                    "env/reward_std": float(scores.std(ddof=1)), "objective/kl": 0.5 * step}) + "\n")
            roll.write(json.dumps({"step": step, "scores": scores.tolist(),
                                   "queries": [f"query {i}" for i in range(BATCH)],
                                   "responses": [f" response {i}" for i in range(BATCH)]}) + "\n")
    if not rollouts:
        (run_dir / "rollouts.jsonl").unlink()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, policy_dir: Path, reward_dir: Path, imdb_dir: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path_factory.mktemp("runs") / "fake-run"
    run.mkdir()
    cfg = Config()
    cfg.rollout.policy, cfg.reward.model, cfg.data.dataset = str(policy_dir), str(reward_dir), str(imdb_dir)
    cfg.run.name, cfg.run.steps = "fake-run", STEPS
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    # The "tuned" policy: the stand-in with slightly perturbed weights, saved as the learner does.
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * p.std() * torch.randn(p.shape, generator=generator))
    model.save_pretrained(run / "policy")
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(run / "policy")
    from safetensors.torch import save_file

    save_file({"summary.weight": torch.zeros(1, model.config.n_embd), "summary.bias": torch.zeros(1)},
              str(run / "policy" / "value_head.safetensors"))
    write_logs(run)
    return run


@pytest.fixture(scope="module")
def report(run_dir: Path) -> dict:
    return make_report(run_dir, n_queries=N_QUERIES, seed=SEED)


@pytest.fixture(scope="module")
def csv_rows(report) -> list[dict]:
    with report["csv"].open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_figure_is_a_png_with_two_panels(report, run_dir: Path):
    import matplotlib.pyplot as plt

    path = report["figure"]
    assert path == run_dir / "reward.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = plt.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4) and image.shape[0] > 400 and image.shape[1] > 600
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_mean_panel_falls_back_to_stats(tmp_path: Path):
    write_logs(tmp_path, rollouts=False)
    out = plot_rewards(tmp_path)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    steps, mean, std, scores, source = reward_series(tmp_path)
    assert source == "stats.jsonl" and scores is None and list(steps) == list(range(STEPS))


def test_series_skips_non_finite_rewards_and_a_cut_off_line(tmp_path: Path):
    write_logs(tmp_path)
    with (tmp_path / "rollouts.jsonl").open("a") as f:
        f.write(json.dumps({"step": STEPS + 1, "scores": [float("nan"), 1.0, 2.0]}) + "\n" + '{"step": 9, "sco')
    steps, mean, std, scores, source = reward_series(tmp_path)
    assert source == "rollouts.jsonl" and list(steps) == [*range(STEPS), STEPS + 1]
    assert mean[-1] == pytest.approx(1.5) and len(scores[-1]) == 2
    step_edges, edges, share = histogram_grid(steps, scores)
    assert share.shape == (len(edges) - 1, STEPS + 2) and np.isnan(share[:, STEPS]).all()
    np.testing.assert_allclose(np.delete(share, STEPS, axis=1).sum(axis=0), 1.0)


def test_csv_has_one_row_per_query_and_its_rewards_are_the_reward_models(report, csv_rows, reward_dir: Path):
    from rewards.scorer import RewardSettings, SentimentScorer

    assert len(csv_rows) == N_QUERIES
    scorer = SentimentScorer(RewardSettings(model=str(reward_dir), torch_threads=torch.get_num_threads()))
    for side in ("before", "after"):
        texts = [r["query"] + r[f"response {side}"] for r in csv_rows]
        rescored = scorer.score(texts)
        np.testing.assert_allclose([float(r[f"reward {side}"]) for r in csv_rows], rescored, atol=1e-4, rtol=0)
        # The table's texts are exactly those the reward model read.
        assert texts == [r[f"text_{side}"] for r in report["rows"]]
        assert report[f"mean_{side}"] == pytest.approx(np.mean(rescored), abs=1e-4)
        assert report[f"median_{side}"] == pytest.approx(np.median(rescored), abs=1e-4)


def test_queries_are_fixed_test_split_openings(report, run_dir: Path):
    from learner.orchestration.data import load_texts
    from learner.core.models import load_tokenizer

    cfg = load_run_config(run_dir)
    reviews = load_texts(cfg.data.dataset, "test")
    for row in report["rows"]:
        review = reviews[row["review_index"]]
        assert len(review) > cfg.data.min_review_chars
        assert review.startswith(row["query"]) and row["query"]
        assert cfg.data.query_min_tokens <= len(row["query_ids"]) <= cfg.data.query_max_tokens
    tokenizer = load_tokenizer(cfg.rollout.policy)
    again, _ = held_out_queries(cfg, tokenizer, N_QUERIES, SEED)
    assert again == [r["query_ids"] for r in report["rows"]]
    other, _ = held_out_queries(cfg, tokenizer, N_QUERIES, SEED + 1)
    assert other != again


def test_responses_are_the_policies_own_samples_with_the_same_seed(report, csv_rows, run_dir: Path, policy_dir: Path):
    from actors.rollout import RolloutSettings, RolloutWorker

    queries = [r["query_ids"] for r in report["rows"]]
    for side, policy in (("before", policy_dir), ("after", run_dir / "policy")):
        worker = RolloutWorker(RolloutSettings(policy=str(policy), seed=SEED, torch_threads=torch.get_num_threads()))
        rollout = worker.generate(queries, step=0, shard=0)
        assert rollout.texts == [r["query"] + r[f"response {side}"] for r in csv_rows]
        assert rollout.responses == [r[f"response_ids_{side}"] for r in report["rows"]]
    # Same seed, so the same drawn lengths; the perturbed weights still sample differently.
    assert any(r["response_before"] != r["response_after"] for r in report["rows"])


def test_markdown_table_and_summary(report, run_dir: Path):
    text = (run_dir / TABLE_MD).read_text()
    assert report["markdown"] == run_dir / TABLE_MD
    table = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    assert len(table) == 1 + N_QUERIES  # header + one row per query
    assert all(line.count(" | ") == 4 for line in table)
    summary = [line for line in text.splitlines() if "mean" in line and "median" in line]
    assert len(summary) == 1
    for key in ("mean_before", "mean_after", "median_before", "median_after"):
        assert f"{report[key]:+.3f}" in summary[0]


def test_markdown_cells_are_escaped():
    assert md_cell("a | b<br /><br />c\nd") == "a \\| b c<br>d"
    assert "\n" not in md_cell("x\r\ny") and "|" not in md_cell("x|y").replace("\\|", "")


def test_missing_run_dir_is_one_line_error(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "learner.report", str(tmp_path / "nope")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], proc.stderr


def test_run_dir_without_policy_is_an_error(tmp_path: Path, run_dir: Path, capsys):
    (tmp_path / "config.yaml").write_text((run_dir / "config.yaml").read_text())
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "policy/" in err[0]



def test_figure_axis_names_the_runs_reward():
    from dataclasses import replace

    from rewards.settings import SourceSpec

    cfg = Config()
    assert reward_axis(cfg) == "reward (POSITIVE logit)"
    mixed = replace(cfg, reward=replace(cfg.reward, sources=(SourceSpec("sentiment", 1.0, model="m"),
                                                             SourceSpec("brevity", 0.5, function="b:brevity"))))
    assert reward_axis(mixed) == "reward (1 * sentiment + 0.5 * brevity)"
