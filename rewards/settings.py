"""The reward side's settings: a plain dataclass without torch, so the learner's command line
(``--help`` included) builds without loading the model code."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RewardSettings:
    """The reward side's own config (the learner's config tree hands it over)."""

    model: str = "lvwerra/distilbert-imdb"
    """Hub id or local `save_pretrained` folder (tried as a local folder first)."""
    positive_label: str = "POSITIVE"
    """Reward = raw logit of this label, found by name in config.id2label, never by position."""
    max_length: int = 512
    """Tokenizer truncation, in classifier tokens (DistilBERT has 512 positions)."""
    device: str = "auto"
    """"auto": cuda if this process sees a GPU, else cpu; or any torch device string."""
    torch_threads: int = 1
    """torch intra-op threads of the scoring process, set once at start-up (the driver gives a
    reward actor every core: it scores while the rollout actors wait for it)."""
    max_batch_size: int = 256
    """Most texts in one forward pass (the server's merged batches and the scorer's chunks)."""
    max_wait_ms: float = 1000.0
    """Server: the longest the first queued request waits for others to join its pass; a pass
    starts earlier once every rollout actor of the replica has asked (rewards/server.py)."""
