"""End-to-end on your own task: a tiny random Llama as the policy (built here, the stand-in's
tokenizer), whole texts from a .jsonl file as prompts, held-out prompts scored every 2 steps. A
driver killed mid-run resumes exactly, evaluations included (as tests/test_faults.py does for
the recipe)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import IMDB_DIR, DriverRun, run_driver
from test_faults import _kill_at, _same_statistics

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def whole_args(data: Path, policy: Path) -> list[str]:
    """4 small steps of ``policy`` on whole prompts of up to 16 tokens from ``data`` (a .jsonl
    file, which is also the held-out split), one rollout actor, a checkpoint every 2 steps, 16
    held-out prompts scored with the weights after steps 0 and 2."""
    return ["--config", "configs/stand-in-quick.yaml", "--ppo.batch_size", "16", "--ppo.mini_batch_size", "16",
            "--run.report_queries", "0", "--run.steps", "4", "--cluster.num_rollout_workers", "1",
            "--run.checkpoint_every", "2", "--dataset", str(data), "--data.prompt_mode", "whole",
            "--data.query_max_tokens", "16", "--policy", str(policy), "--run.eval_every", "2",
            "--data.eval_prompts", "16"]


@pytest.fixture(scope="module")
def llama(tmp_path_factory, policy_dir: Path) -> Path:
    import torch
    from transformers import AutoTokenizer

    from test_models import ARCHITECTURES

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    torch.manual_seed(0)
    ARCHITECTURES["llama"](len(tokenizer), tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    """200 texts of varied length (short ones included) as a user's .jsonl file."""
    texts = pq.read_table(IMDB_DIR / "train.parquet").column("text").to_pylist()[:200]
    file = tmp_path_factory.mktemp("own-data") / "prompts.jsonl"
    file.write_text("".join(json.dumps({"text": t[:40 + 3 * i]}) + "\n" for i, t in enumerate(texts)))
    return file


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, prompts_file: Path, llama: Path) -> DriverRun:
    out = tmp_path_factory.mktemp("whole")
    run = run_driver(whole_args(prompts_file, llama), out, "whole")
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_whole_prompts_come_from_the_file(whole_run: DriverRun, prompts_file: Path):
    assert json.loads((whole_run.run_dir / "policy" / "config.json").read_text())["model_type"] == "llama"
    assert [s["step"] for s in whole_run.stats() if "eval/reward_mean" in s] == [0, 2]
    texts = [json.loads(line)["text"] for line in prompts_file.read_text().splitlines()]
    rollouts = [json.loads(line) for line in (whole_run.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 4
    for query in rollouts[0]["queries"]:
        assert any(t.endswith(query) for t in texts), query  # each prompt is a text's end


def test_killed_driver_resumes_a_whole_prompt_run_exactly(whole_run: DriverRun, prompts_file: Path, llama: Path,
                                                          tmp_path: Path):
    _kill_at(whole_args(prompts_file, llama), tmp_path, "killed", "step 3/4", "driver")
    resumed = run_driver(["--resume", str(tmp_path / "killed")], tmp_path, "killed")
    assert resumed.returncode == 0 and "at step 3" in resumed.output, resumed.output[-3000:]
    _same_statistics(resumed.stats(), whole_run.stats())  # eval/reward_mean of step 3 too
    assert "eval/reward_mean" in resumed.stats()[2]
