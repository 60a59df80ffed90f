"""Prompts from your own data: a single .jsonl/.csv/.parquet file, whole texts as prompts, the
tokenizer's chat template, and one-line errors for files that cannot work. The resume of a
whole-mode run from a .jsonl file is an end-to-end test in test_evaluation.py."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from conftest import REPO
from learner.config import ConfigError, DataConfig, parse_args
from learner.core.models import load_tokenizer
from learner.orchestration.data import DataState, Prompts, PromptStream, held_out_prompts, load_texts

TEMPLATE = ("{% for m in messages %}<|user|> {{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %} <|assistant|>{% endif %}")


@pytest.fixture(scope="module")
def texts(imdb_dir: Path) -> list[str]:
    """40 reviews and two short prompts, as a user's own data would mix them."""
    return pq.read_table(imdb_dir / "test.parquet").column("text").to_pylist()[:40] + ["Short one.", "What is love?"]


@pytest.fixture(scope="module")
def files(tmp_path_factory, texts: list[str]) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("prompt-files")
    out = {"jsonl": folder / "p.jsonl", "csv": folder / "p.csv", "parquet": folder / "p.parquet"}
    out["jsonl"].write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pa_csv.write_csv(pa.table({"id": list(range(len(texts))), "text": texts}), out["csv"])
    pq.write_table(pa.table({"text": texts}), out["parquet"])
    return out


@pytest.fixture(scope="module")
def tokenizer(policy_dir: Path):
    return load_tokenizer(str(policy_dir))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet"])
def test_a_single_file_is_every_split(files, texts, kind: str):
    assert load_texts(str(files[kind]), "train") == texts
    assert load_texts(str(files[kind]), "test") == texts
    # A split may name a file of its own (a held-out set beside the training file).
    assert load_texts(str(files["jsonl"]), str(files[kind])) == texts


def test_whole_mode_keeps_every_text_and_its_last_tokens(texts, tokenizer):
    cfg = DataConfig(prompt_mode="whole", query_max_tokens=24)
    assert cfg.min_chars == 0 and DataConfig().min_chars == 200  # the recipe's filter stays in opening mode
    stream = PromptStream(texts, tokenizer, cfg, batch_size=8, seed=0)
    assert len(stream.texts) == len(texts)  # short prompts are prompts too
    queries = stream.prompts(texts, [0] * len(texts))
    for text, query in zip(texts, queries):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert query == ids[-24:]  # cut from the left: the text's end, next to where the response starts
    assert queries[-1] == tokenizer("What is love?", add_special_tokens=False)["input_ids"]


def test_whole_mode_stream_restores_its_position(texts, tokenizer):
    cfg = DataConfig(prompt_mode="whole", query_max_tokens=16)
    a = PromptStream(texts, tokenizer, cfg, batch_size=8, seed=3)
    for _ in range(7):  # crosses into the second pass (5 batches per pass)
        a.next_batch()
    saved = DataState(a.state.epoch, a.state.position)
    want = [a.next_batch() for _ in range(3)]
    b = PromptStream(texts, tokenizer, cfg, batch_size=8, seed=3)
    b.load_state(saved)
    assert [b.next_batch() for _ in range(3)] == want


def test_chat_template_wraps_each_prompt(texts, tokenizer, tmp_path: Path, policy_dir: Path):
    folder = tmp_path / "chat"
    shutil.copytree(policy_dir, folder)
    chat = load_tokenizer(str(folder))
    chat.chat_template = TEMPLATE
    before = chat("<|user|> ", add_special_tokens=False)["input_ids"]
    after = chat(" <|assistant|>", add_special_tokens=False)["input_ids"]
    for mode, longest in (("opening", 7 + len(before) + len(after)), ("whole", 30)):
        prompts = Prompts(chat, DataConfig(prompt_mode=mode, chat_template=True, query_max_tokens=longest - (
            len(before) + len(after) if mode == "opening" else 0)))
        assert prompts.longest == longest
        for query in prompts(texts[:5], [4] * 5):
            assert query[:len(before)] == before and query[-len(after):] == after and len(query) <= longest
            assert chat.decode(query).startswith("<|user|> ") and chat.decode(query).endswith(" <|assistant|>")
    with pytest.raises(ConfigError, match=r"^data.chat_template: the policy's tokenizer .* has no chat template"):
        Prompts(tokenizer, DataConfig(chat_template=True))


def test_held_out_prompts_are_fixed_by_the_seed(texts, tokenizer):
    prompts = Prompts(tokenizer, DataConfig(prompt_mode="whole", query_max_tokens=12))
    a, picked = held_out_prompts(texts, prompts, 10, seed=0)
    assert (a, picked) == held_out_prompts(texts, prompts, 10, seed=0)
    assert held_out_prompts(texts, prompts, 10, seed=1)[1] != picked
    assert len(held_out_prompts(texts, prompts, 500, seed=0)[0]) == len(texts)  # fewer when there are fewer


def test_bad_data_files_are_one_line_errors(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "broken.jsonl").write_text('{"text": \n')
    (tmp_path / "notext.csv").write_text("review\nsomething long enough\n")
    (tmp_path / "p.txt").write_text("a prompt\n")
    cases = {"empty.jsonl": r"data.dataset: '.*empty.jsonl' is empty",
             "broken.jsonl": r"data.dataset: '.*broken.jsonl' could not be read as json",
             "notext.csv": r"data.text_column: '.*notext.csv' has no column 'text' \(columns: review\)"}
    for name, message in cases.items():
        with pytest.raises(ConfigError, match=message) as err:
            load_texts(str(tmp_path / name), "train")
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"data.dataset: '.*p.txt' is not a .jsonl, .csv or .parquet file"):
        parse_args(["--dataset", str(tmp_path / "p.txt")])
    with pytest.raises(ConfigError, match=r"data.dataset: 'prompts.jsonl' does not exist"):
        parse_args(["--dataset", "prompts.jsonl"])  # a bare file name is no hub id
    with pytest.raises(ConfigError, match=r"data.prompt_mode 'all' must be one of opening, whole"):
        parse_args(["--data.prompt_mode", "all"])


def test_a_bad_data_file_stops_the_run_before_ray_with_one_line(tmp_path: Path):
    (tmp_path / "notext.jsonl").write_text('{"review": "a long review"}\n')
    proc = subprocess.run([sys.executable, "-m", "learner.main", "--config", "configs/stand-in-quick.yaml",
                           "--dataset", str(tmp_path / "notext.jsonl"), "--out-dir", str(tmp_path / "runs")],
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "has no column 'text' (columns: review)" in errors[0] and "Traceback" not in proc.stderr
    assert "Ray dashboard" not in proc.stdout and not (tmp_path / "runs").exists()


def test_a_tokenizer_that_adds_a_bos_token_gets_it_before_every_prompt(policy_dir: Path):
    """Llama-style tokenizers put BOS before a text; a prompt starts with it as the model was trained."""
    from tokenizers.processors import TemplateProcessing

    tok = load_tokenizer(str(policy_dir))
    assert Prompts(tok, DataConfig()).before == []  # GPT-2's adds nothing: the recipe's queries
    bos = tok.eos_token_id
    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.eos_token} $A",
                                                       special_tokens=[(tok.eos_token, bos)])
    text = "the film is a fine one to watch"
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert Prompts(tok, DataConfig(prompt_mode="whole", query_max_tokens=5))([text], [0]) == [[bos] + plain[-4:]]
    opening = Prompts(tok, DataConfig(query_max_tokens=5))
    assert opening([text], [3]) == [[bos] + plain[:3]] and opening.longest == 6


def test_whole_mode_takes_any_query_max_tokens(texts, tokenizer):
    cfg = parse_args(["--data.prompt_mode", "whole", "--data.query_max_tokens", "1"]).data  # below query_min_tokens
    stream = PromptStream(texts, tokenizer, cfg, batch_size=8, seed=0)
    assert all(len(q) == 1 for q in stream.next_batch())
    with pytest.raises(ConfigError, match=r"data.query_min_tokens \(2\) exceeds data.query_max_tokens \(1\)"):
        parse_args(["--data.query_max_tokens", "1"])
