"""Rollout workers: sample responses with the current policy and hand them to a scorer.

Never imports learner/ or rewards/: the learner drives these classes, not the other way round.
"""
from actors.rollout import Rollout, RolloutSettings, RolloutWorker

__all__ = ["Rollout", "RolloutSettings", "RolloutWorker"]
