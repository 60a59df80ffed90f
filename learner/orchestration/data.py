"""IMDB prompts as in the recipe: reviews over 200 characters, query = first k tokens.

k is drawn uniformly from [query_min_tokens, query_max_tokens] once per review (the
notebook's ``LengthSampler`` in ``dataset.map``), the order is a seeded shuffle per pass,
and batches drop the remainder (``drop_last``): 24,895 reviews // 128 = 194 steps.
The position (pass, index) is saved in checkpoints and restored on resume.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerBase

from learner.config import ConfigError, DataConfig

log = logging.getLogger(__name__)


def load_texts(dataset: str, split: str, text_column: str = "text") -> list[str]:
    """The text column of a split, from a local folder of parquet files or a hub dataset."""
    path = Path(dataset).expanduser()
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


@dataclass
class DataState:
    """Where the prompt stream stands: the pass over the data and the index in its order."""

    epoch: int = 0
    position: int = 0


class PromptStream:
    """Batches of query token ids, reproducible from (seed, state)."""

    def __init__(self, texts: list[str], tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                 batch_size: int, seed: int) -> None:
        self.texts = [texts[i] for i in review_indices(texts, cfg.min_review_chars)]
        if len(self.texts) < batch_size:
            raise ConfigError(f"data.dataset: {len(self.texts)} reviews longer than {cfg.min_review_chars} "
                              f"characters, fewer than one batch (ppo.batch_size={batch_size})")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.seed = seed
        # k once per review, independent of the shuffle, as the notebook's dataset.map did.
        self.query_lens = np.random.default_rng([seed, 7]).integers(
            cfg.query_min_tokens, cfg.query_max_tokens + 1, size=len(self.texts))
        self.state = DataState()
        self._order = self._permutation(0)
        log.info("%d reviews longer than %d characters: %d batches per pass",
                 len(self.texts), cfg.min_review_chars, self.steps_per_epoch)

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
        return first_tokens(self.tokenizer, [self.texts[i] for i in idx], [int(self.query_lens[i]) for i in idx])

    def load_state(self, state: DataState) -> None:
        if state.epoch != self.state.epoch:
            self._order = self._permutation(state.epoch)
        self.state = DataState(state.epoch, state.position)
