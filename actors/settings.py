"""The rollout worker's settings: a plain dataclass without torch, so the learner's command
line (``--help`` included) builds without loading the model code."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RolloutSettings:
    """The rollout worker's own config (the learner's config tree hands it over)."""

    policy: str = "lvwerra/gpt2-imdb"
    """Hub id or local save_pretrained folder of the policy (tried as a local folder first)."""
    response_min_tokens: int = 4
    """Smallest per-query max_new_tokens; each query draws uniformly from [min, max] inclusive."""
    response_max_tokens: int = 15
    """Largest per-query max_new_tokens."""
    top_k: int = 0
    """0 disables top-k filtering (the recipe)."""
    top_p: float = 1.0
    """1.0 disables nucleus filtering (the recipe)."""
    temperature: float = 1.0
    """Sampling temperature (the recipe: 1). Log-probs are of the untempered policy, as in TRL."""
    seed: int = 0
    """Base seed; lengths and sampling are seeded from (seed, step, shard)."""
    device: str = "auto"
    """'auto': cuda if available else cpu; or any torch device string."""
    torch_threads: int = 1
    """torch.set_num_threads in the worker, so several actors on one node don't oversubscribe cores."""

    def __post_init__(self) -> None:
        if not 1 <= self.response_min_tokens <= self.response_max_tokens:
            raise ValueError(
                f"need 1 <= response_min_tokens <= response_max_tokens, got "
                f"{self.response_min_tokens} and {self.response_max_tokens}")
        if self.top_k < 0 or not 0.0 < self.top_p <= 1.0 or self.temperature <= 0.0:
            raise ValueError(f"need top_k >= 0, 0 < top_p <= 1 and temperature > 0, got top_k={self.top_k}, "
                             f"top_p={self.top_p}, temperature={self.temperature}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
