"""The config tree (defaults, YAML, flags, validation) and the IMDB prompt stream."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from learner.config import Config, ConfigError, DataConfig, parse_args
from learner.orchestration.data import DataState, PromptStream, load_texts


def test_defaults_are_the_recipe():
    cfg = Config()
    assert cfg.policy == "lvwerra/gpt2-imdb" and cfg.reward.model == "lvwerra/distilbert-imdb"
    assert (cfg.ppo.batch_size, cfg.ppo.mini_batch_size, cfg.ppo.ppo_epochs) == (128, 128, 4)
    assert cfg.ppo.learning_rate == 1.41e-5 and cfg.ppo.init_kl_coef == 0.2 and cfg.ppo.target == 6
    assert (cfg.data.query_min_tokens, cfg.data.query_max_tokens) == (2, 7)
    assert (cfg.rollout.response_min_tokens, cfg.rollout.response_max_tokens) == (4, 15)
    assert (cfg.rollout.top_k, cfg.rollout.top_p) == (0, 1.0)


def test_yaml_then_flags(tmp_path: Path):
    file = tmp_path / "c.yaml"
    file.write_text("ppo:\n  learning_rate: 3.0e-4\n  batch_size: 64\n  mini_batch_size: 16\nrun:\n  steps: 5\n")
    cfg = parse_args(["--config", str(file), "--ppo.batch-size", "32", "--seed", "7"])
    assert cfg.ppo.learning_rate == 3e-4 and cfg.ppo.batch_size == 32 and cfg.run.steps == 5
    assert cfg.run.seed == 7


@pytest.mark.parametrize("argv, message", [
    (["--ppo.batch_size", "100"], r"ppo.batch_size \(100\) must be a multiple of ppo.mini_batch_size \(128\)"),
    (["--ppo.mini_batch_size", "0"], r"ppo.mini_batch_size \(0\) must be > 0"),
    (["--ppo.learnin_rate", "1"], r"unknown setting 'ppo.learnin_rate'; did you mean 'ppo.learning_rate'"),
    (["--ppo.batch_size", "many"], r"--ppo.batch_size: invalid literal for int\(\) with base 10: 'many'"),
    (["--ppo.kl_penalty", "abs"], r"ppo.kl_penalty 'abs' is not supported"),
    (["--policy", "./no/such/folder"], r"rollout.policy: './no/such/folder' does not exist"),
    (["--cluster.num_rollout_workers", "300"], r"cluster.num_rollout_workers \(300\) exceeds ppo.batch_size"),
    (["--config", "/no/such.yaml"], r"--config: '/no/such.yaml' does not exist"),
])
def test_bad_settings_are_one_line_errors(argv, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_args(argv)
    assert "\n" not in str(err.value)


def test_unknown_yaml_key(tmp_path: Path):
    file = tmp_path / "c.yaml"
    file.write_text("ppo:\n  cliprnage: 0.1\n")
    with pytest.raises(ConfigError, match="unknown setting 'ppo.cliprnage'; did you mean 'ppo.cliprange'"):
        parse_args(["--config", str(file)])


# ----------------------------------------------------------------------------- data

def test_recipe_filter_on_imdb(imdb_dir: Path, policy_dir: Path):
    texts = load_texts(str(imdb_dir), "train")
    tok = AutoTokenizer.from_pretrained(policy_dir)
    stream = PromptStream(texts, tok, DataConfig(dataset=str(imdb_dir)), batch_size=128, seed=0)
    assert len(stream.texts) == 24895  # the recipe's figure
    assert stream.steps_per_epoch == 194
    batch = stream.next_batch()
    assert len(batch) == 128 and all(2 <= len(q) <= 7 for q in batch)
    assert {len(q) for q in batch} == set(range(2, 8))  # every length occurs in 128 draws


def test_position_saves_and_restores(imdb_dir: Path, policy_dir: Path):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    texts = load_texts(str(imdb_dir), "test")[:1000]
    cfg = DataConfig(dataset=str(imdb_dir))
    a = PromptStream(texts, tok, cfg, batch_size=100, seed=3)
    for _ in range(12):  # crosses into the second pass
        a.next_batch()
    saved = DataState(a.state.epoch, a.state.position)
    assert saved.epoch == 1
    want = [a.next_batch() for _ in range(3)]
    b = PromptStream(texts, tok, cfg, batch_size=100, seed=3)
    b.load_state(saved)
    assert [b.next_batch() for _ in range(3)] == want
    c = PromptStream(texts, tok, cfg, batch_size=100, seed=4)
    assert c.next_batch() != PromptStream(texts, tok, cfg, batch_size=100, seed=3).next_batch()


def test_dataset_without_text_column(tmp_path: Path):
    pq.write_table(pa.table({"review": ["x" * 300] * 4}), tmp_path / "train.parquet")
    with pytest.raises(ConfigError, match="data.text_column: dataset .* has no column 'text' \\(columns: review\\)"):
        load_texts(str(tmp_path), "train")


def test_dataset_folder_without_split(tmp_path: Path):
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "test.parquet")
    with pytest.raises(ConfigError, match="no 'train.parquet'.*found: test.parquet"):
        load_texts(str(tmp_path), "train")


def test_too_few_rows_for_a_batch(policy_dir: Path):
    tok = AutoTokenizer.from_pretrained(policy_dir)
    with pytest.raises(ConfigError, match=r"3 reviews longer than 200 characters, fewer than one batch"):
        PromptStream(["y" * 300] * 3 + ["short"], tok, DataConfig(), batch_size=8, seed=0)


def test_resumed_learner_takes_this_runs_learning_rate():
    """On --resume, Adam's saved state must not bring back the old learning rate."""
    import json

    from learner.config import PPOConfig
    from learner.core.actor import LearnerActor

    from conftest import SHARED

    case = SHARED / "reference" / "ppo-golden" / "case1"
    step = json.loads((case / "case.json").read_text())["steps"][0]
    n = len(step["queries"])
    first = LearnerActor(str(case / "policy"), PPOConfig(learning_rate=1e-3, batch_size=n, mini_batch_size=n),
                       device="cpu")
    first.step(step["queries"], step["responses"], step["scores"])
    resumed = LearnerActor(str(case / "policy"), PPOConfig(learning_rate=5e-4, batch_size=n, mini_batch_size=n),
                         device="cpu")
    assert resumed.load_state_bytes(first.state_bytes()) == 1
    stats = resumed.step(step["queries"], step["responses"], step["scores"])
    assert stats["ppo/learning_rate"] == 5e-4
    assert resumed.learner.optimizer.state  # Adam's moments came back with the weights
