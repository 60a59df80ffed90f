"""The reward side: a sentiment classifier's raw POSITIVE logit, served in merged batches.

`SentimentScorer` scores a list of strings in one padded forward pass; `RewardServer` is
the async Ray actor body that merges the requests of all rollout actors into such passes.
Never imports learner/ or actors/ (arrows point learner -> rewards). The names below load on
first use, so ``rewards.settings`` alone imports no torch.
"""
import importlib

_WHERE = {"RewardServer": "rewards.server", "RewardSettings": "rewards.settings", "SentimentScorer": "rewards.scorer"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")
