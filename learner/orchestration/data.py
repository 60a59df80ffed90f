"""The prompt stream: texts from a dataset, turned into query token ids as data.prompt_mode says.

The recipe (``prompt_mode opening``): IMDB reviews over 200 characters, query = the first k
tokens, k drawn uniformly from [query_min_tokens, query_max_tokens] once per review (the
notebook's ``LengthSampler`` in ``dataset.map``). ``prompt_mode whole``: the whole text is the
prompt, cut from the left to its last query_max_tokens tokens. ``data.chat_template`` wraps
either in the tokenizer's chat template. The order is a seeded shuffle per pass, and batches
drop the remainder (``drop_last``): 24,895 reviews // 128 = 194 steps. The position (pass,
index) is saved in checkpoints and restored on resume; everything else is a function of the
seed, so a resumed run continues the same stream in every mode.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from learner.config import DATA_FILE_KINDS, ConfigError, DataConfig, is_data_file
from modelhost.errors import one_line

log = logging.getLogger(__name__)


def load_texts(dataset: str, split: str, text_column: str = "text") -> list[str]:
    """The text column of a split: a .jsonl/.csv/.parquet file (``split`` itself when it names
    one, else ``dataset`` when it is one: a single file is every split), a local folder of
    ``<split>.parquet`` files, or a hub dataset."""
    path = Path(dataset).expanduser()
    if is_data_file(split) or path.is_file():
        return _file_texts(Path(split).expanduser() if is_data_file(split) else path, text_column)
    if path.is_dir():
        file = path / f"{split}.parquet"
        if not file.is_file():
            found = sorted(p.name for p in path.glob("*.parquet"))
            raise ConfigError(f"data.dataset: no '{split}.parquet' in {path} (found: {', '.join(found) or 'none'}); "
                              "set data.split or point data.dataset at a folder of <split>.parquet files")
        try:
            table = pq.read_table(file)
        except (pa.ArrowException, OSError) as err:
            raise ConfigError(f"data.dataset: {file} is not a readable parquet file ({str(err).splitlines()[0][:160]}); "
                              "write it again") from None
        columns = table.column_names
        texts = table.column(text_column).to_pylist() if text_column in columns else None
    else:
        try:
            import datasets

            ds = datasets.load_dataset(dataset, split=split)
        except Exception as err:  # the hub raises many types; all mean the same to a user
            raise ConfigError(f"data.dataset: '{dataset}' is neither a local folder nor a loadable hub dataset "
                              f"({type(err).__name__}); pass a local folder of parquet files") from err
        columns = ds.column_names
        texts = ds[text_column] if text_column in columns else None
    if texts is None:
        raise ConfigError(f"data.text_column: dataset '{dataset}' has no column '{text_column}' "
                          f"(columns: {', '.join(columns)})")
    return texts


def _file_texts(file: Path, text_column: str) -> list[str]:
    """The text column of one data file, read with ``datasets`` (its builder chosen by the suffix)."""
    import datasets

    kind = DATA_FILE_KINDS.get(file.suffix.lower())
    if kind is None:
        raise ConfigError(f"data.dataset: '{file}' is not a .jsonl, .csv or .parquet file; pass one of those, a "
                          "folder of <split>.parquet files or a hub dataset")
    if file.stat().st_size == 0:
        raise ConfigError(f"data.dataset: '{file}' is empty; it needs rows with a '{text_column}' column")
    datasets.disable_progress_bars()  # the driver prints its own lines
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a malformed file: our line, not its log too
    try:
        ds = datasets.load_dataset(kind, data_files=str(file), split="train")
    except Exception as err:  # a malformed file raises the builder's own types
        raise ConfigError(f"data.dataset: '{file}' could not be read as {kind} ({one_line(err, 160)})") from None
    finally:
        datasets.logging.set_verbosity(level)
    if text_column not in ds.column_names:
        raise ConfigError(f"data.text_column: '{file}' has no column '{text_column}' "
                          f"(columns: {', '.join(ds.column_names) or 'none'}); set data.text_column")
    if ds.num_rows == 0:
        raise ConfigError(f"data.dataset: '{file}' holds no rows")
    return ds[text_column]


def review_indices(texts: list, min_chars: int) -> list[int]:
    """Indices of the reviews the recipe prompts with: texts longer than ``min_chars`` characters."""
    return [i for i, text in enumerate(texts) if isinstance(text, str) and len(text) > min_chars]


def first_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], lengths: list[int]) -> list[list[int]]:
    """The first k policy tokens of each text (no special tokens), k from ``lengths``: a query.

    Truncation happens after tokenizing the whole text, so the first k tokens are exactly
    those of the full review.
    """
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max(lengths))["input_ids"]
    return [row[:k] for row, k in zip(ids, lengths)]


def last_tokens(tokenizer: PreTrainedTokenizerBase, texts: list[str], n: int) -> list[list[int]]:
    """The last n policy tokens of each text (no special tokens): the text cut from the left."""
    side, tokenizer.truncation_side = tokenizer.truncation_side, "left"
    try:
        return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=n)["input_ids"]
    finally:
        tokenizer.truncation_side = side


def _around_text(tokenizer: PreTrainedTokenizerBase, chat_template: bool) -> tuple[list[int], list[int]]:
    """The token ids that go before and after a prompt's text: the chat template's (the text as the
    user's message, the assistant's turn opened), or else the special tokens the tokenizer itself
    puts around a text (a BOS for Llama-style tokenizers; nothing for GPT-2's)."""
    marker = "\u2063PROMPT\u2063"  # invisible separators: no template writes them itself
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.chat_template: the policy's tokenizer ({tokenizer.name_or_path}) has no chat "
                              "template; set data.chat_template false or use a policy whose tokenizer has one")
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                             tokenize=False)
        if text.count(marker) != 1:
            raise ConfigError("data.chat_template: the tokenizer's chat template does not hold the user's message "
                              "once; set data.chat_template false")
        before, after = text.split(marker)
        encode = lambda part: tokenizer(part, add_special_tokens=False)["input_ids"] if part else []  # noqa: E731
        return encode(before), encode(after)
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):  # the special tokens before the text; those after are not
        if full[start:start + len(plain)] == plain:  # a prompt's (an EOS would end it)
            return full[:start], []
    return [], []


class Prompts:
    """Texts to query token ids, as ``data.prompt_mode`` and ``data.chat_template`` say."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig) -> None:
        self.tokenizer, self.cfg = tokenizer, cfg
        self.before, self.after = _around_text(tokenizer, cfg.chat_template)
        self.room = cfg.query_max_tokens - len(self.before) - len(self.after)  # whole mode: the text's tokens
        if cfg.prompt_mode == "whole" and self.room < 1:
            raise ConfigError(f"data.query_max_tokens ({cfg.query_max_tokens}) leaves no room for the text next to "
                              f"the {len(self.before) + len(self.after)} tokens around it (template, BOS); raise it")

    @property
    def longest(self) -> int:
        """The most tokens a query can have."""
        if self.cfg.prompt_mode == "whole":
            return self.cfg.query_max_tokens
        return self.cfg.query_max_tokens + len(self.before) + len(self.after)

    def __call__(self, texts: list[str], lengths: list[int]) -> list[list[int]]:
        """Each text's query; ``lengths`` are the opening mode's k per text."""
        if self.cfg.prompt_mode == "whole":
            body = last_tokens(self.tokenizer, texts, self.room)
        else:
            body = first_tokens(self.tokenizer, texts, lengths)
        return [self.before + ids + self.after for ids in body]


def opening_range(cfg: DataConfig) -> tuple[int, int]:
    """numpy's [low, high) for the opening mode's k (whole mode draws it too, unused, and may set
    query_max_tokens below query_min_tokens)."""
    return min(cfg.query_min_tokens, cfg.query_max_tokens), cfg.query_max_tokens + 1


def held_out_prompts(texts: list[str], prompts: Prompts, n: int, seed: int) -> tuple[list[list[int]], list[int]]:
    """n fixed queries of ``texts`` (fewer if fewer are long enough) and the index of each one's
    text: texts (without replacement) and the opening mode's k from numpy's default_rng(seed)."""
    cfg = prompts.cfg
    keep = review_indices(texts, cfg.min_chars)
    n = min(n, len(keep))
    rng = np.random.default_rng(seed)
    picked = [keep[i] for i in rng.choice(len(keep), size=n, replace=False)]
    lengths = [int(k) for k in rng.integers(*opening_range(cfg), size=n)]
    return prompts([texts[i] for i in picked], lengths), picked


@dataclass
class DataState:
    """Where the prompt stream stands: the pass over the data and the index in its order."""

    epoch: int = 0
    position: int = 0


class PromptStream:
    """Batches of query token ids, reproducible from (seed, state)."""

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                 batch_size: int, seed: int) -> None:
        self.texts = [texts[i] for i in review_indices(texts, cfg.min_chars)]
        if len(self.texts) < batch_size:
            raise ConfigError(f"data.dataset: {len(self.texts)} reviews longer than {cfg.min_chars} "
                              f"characters, fewer than one batch (ppo.batch_size={batch_size}); "
                              "data.min_review_chars sets the filter")
        self.tokenizer = tokenizer
        self.prompts = Prompts(tokenizer, cfg)
        self.batch_size = batch_size
        self.seed = seed
        # k once per review, independent of the shuffle, as the notebook's dataset.map did.
        self.query_lens = np.random.default_rng([seed, 7]).integers(
            *opening_range(cfg), size=len(self.texts))
        self.state = DataState()
        self._order = self._permutation(0)
        log.info("%d texts longer than %d characters: %d batches per pass",
                 len(self.texts), cfg.min_chars, self.steps_per_epoch)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.texts) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.texts))

    def next_batch(self) -> list[list[int]]:
        """The next batch_size queries, (B, Lq_i) token ids; a new shuffled pass when one ends."""
        if self.state.position + self.batch_size > len(self.texts):
            self.load_state(DataState(self.state.epoch + 1, 0))
        idx = self._order[self.state.position:self.state.position + self.batch_size]
        self.state.position += self.batch_size
        return self.prompts([self.texts[i] for i in idx], [int(self.query_lens[i]) for i in idx])

    def load_state(self, state: DataState) -> None:
        if state.epoch != self.state.epoch:
            self._order = self._permutation(state.epoch)
        self.state = DataState(state.epoch, state.position)
