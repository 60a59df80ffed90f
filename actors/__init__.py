"""Rollout workers: sample responses with the current policy and hand them to a scorer.

Never imports learner/ or rewards/: the learner drives these classes, not the other way round.
The names below load on first use, so ``actors.settings`` alone imports no torch.
"""
import importlib

_WHERE = {"Rollout": "actors.rollout", "RolloutWorker": "actors.rollout", "RolloutSettings": "actors.settings"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'actors' has no attribute {name!r}")
