"""PPO on Ray: ``python -m learner.main`` from a shell, ``learner.train`` from Python.

    from learner import train
    run_dir = train({"rollout": {"policy": "gpt2"}, "run": {"steps": 2}}, reward=my_reward)

Only this function is imported here, so ``python -m learner.main --help`` stays fast: the
settings, Ray and torch load when it is called (learner/api.py).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["train"]


def train(config: Any = None, *, reward: Any = None) -> "Path":
    """Train and return the run directory; see ``learner.api.train``."""
    from learner.api import train as _train

    return _train(config, reward=reward)
