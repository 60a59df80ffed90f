"""The reward side: reward sources (a classifier, a Python function, an HTTP endpoint, a
weighted mix), served in merged batches.

`SentimentScorer` scores a list of strings in one padded forward pass; `rewards.sources`
holds the source kinds and `RewardMix`; `RewardServer` is the async Ray actor body that
merges the requests of all rollout actors into passes over the mix.
Never imports learner/ or actors/ (arrows point learner -> rewards).
"""
from rewards.scorer import SentimentScorer
from rewards.server import RewardServer
from rewards.settings import RewardSettings, SourceSpec

__all__ = ["RewardServer", "RewardSettings", "SentimentScorer", "SourceSpec"]
