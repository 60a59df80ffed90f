"""The reward side: a sentiment classifier's raw POSITIVE logit, served in merged batches.

`SentimentScorer` scores a list of strings in one padded forward pass; `RewardServer` is
the async Ray actor body that merges the requests of all rollout actors into such passes.
Never imports learner/ or actors/ (arrows point learner -> rewards). The names below load on
first use, so ``rewards.settings`` alone imports no torch.
"""
from modelhost.exports import lazy_attributes

_WHERE = {"RewardServer": "rewards.server", "RewardSettings": "rewards.settings", "SentimentScorer": "rewards.scorer"}
__all__ = sorted(_WHERE)
__getattr__ = lazy_attributes(__name__, _WHERE)
