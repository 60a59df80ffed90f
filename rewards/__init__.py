"""The reward side: a sentiment classifier's raw POSITIVE logit, served in merged batches.

`SentimentScorer` scores a list of strings in one padded forward pass; `RewardServer` is
the async Ray actor body that merges the requests of all rollout actors into such passes.
Never imports learner/ or actors/ (arrows point learner -> rewards).
"""
from rewards.scorer import RewardSettings, SentimentScorer
from rewards.server import RewardServer

__all__ = ["RewardServer", "RewardSettings", "SentimentScorer"]
