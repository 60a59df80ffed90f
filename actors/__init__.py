"""Rollout workers: sample responses with the current policy and hand them to a scorer.

Never imports learner/ or rewards/: the learner drives these classes, not the other way round.
The names below load on first use, so ``actors.settings`` alone imports no torch.
"""
from modelhost.exports import lazy_attributes

_WHERE = {"Rollout": "actors.rollout", "RolloutWorker": "actors.rollout", "RolloutSettings": "actors.settings"}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
