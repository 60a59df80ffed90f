"""Live run metrics for the Ray dashboard, through ``ray.util.metrics``.

Ray exports them to Prometheus with a ``ray_`` prefix (``ray_ppo_reward_mean``...); the
dashboard's Metrics view shows them once Grafana is attached (README, "Watching a run"), and
cluster/grafana/ppo-dashboard.json plots them. The reward actors export
``ppo_reward_batch_size`` themselves. Each reward source's mean (``env/reward/<name>``) is
``ppo_reward_source_mean`` with a ``source`` label.
"""
from __future__ import annotations

from typing import Any

from ray.util.metrics import Gauge

# metric name -> (statistic it shows, description)
GAUGES = {
    "ppo_reward_mean": ("env/reward_mean", "mean reward of the step's batch"),
    "ppo_reward_std": ("env/reward_std", "std of the step's rewards"),
    "ppo_kl": ("objective/kl", "mean summed KL(policy || reference) of the responses"),
    "ppo_kl_coef": ("objective/kl_coef", "KL coefficient beta"),
    "ppo_policy_loss": ("ppo/loss/policy", "clipped surrogate loss"),
    "ppo_value_loss": ("ppo/loss/value", "clipped value loss"),
    "ppo_clipfrac": ("ppo/policy/clipfrac", "share of tokens with a clipped ratio"),
    "ppo_value_clipfrac": ("ppo/val/clipfrac", "share of tokens with a clipped value loss"),
    "ppo_samples_per_second": ("samples_per_second", "rollouts trained on per second"),
    "ppo_tokens_per_second": ("tokens_per_second", "query+response tokens trained on per second"),
    "ppo_step": ("step", "steps done"),
    "ppo_eval_reward_mean": ("eval/reward_mean", "mean reward on the fixed held-out prompts (run.eval_every)"),
}
SOURCE_PREFIX = "env/reward/"  # env/reward/<name>: one reward source's mean
PHASES = ("broadcast", "generate", "score", "rollout", "update", "step", "eval")


class RunMetrics:
    def __init__(self, run_name: str) -> None:
        tags = ("run",)
        self.run = {"run": run_name}
        self.gauges = {name: Gauge(name, description=desc, tag_keys=tags) for name, (_, desc) in GAUGES.items()}
        self.last: dict[str, float] = {}  # each gauge's latest value (and each phase's), set again every step
        self.last_phases: dict[str, float] = {}
        self.last_sources: dict[str, float] = {}
        self.phase = Gauge("ppo_phase_seconds", description="seconds per phase of the last step",
                           tag_keys=("run", "phase"))
        self.source = Gauge("ppo_reward_source_mean", description="mean score of one reward source in the step's batch",
                            tag_keys=("run", "source"))
        self.lag = Gauge("ppo_weight_version_lag", description="learner version minus the rollout actor's",
                         tag_keys=("run", "actor"))

    def record(self, stats: dict[str, Any], lags: dict[str, int]) -> None:
        # A statistic not in every step (eval/reward_mean, time/eval) keeps its last value: Ray stops
        # exporting a gauge not set within its TTL, and Prometheus would then mark the series stale.
        self.last.update({name: float(stats[key]) for name, (key, _) in GAUGES.items() if key in stats})
        self.last_phases.update({phase: float(stats[f"time/{phase}"]) for phase in PHASES if f"time/{phase}" in stats})
        self.last_sources.update({key[len(SOURCE_PREFIX):]: float(value) for key, value in stats.items()
                                  if key.startswith(SOURCE_PREFIX)})
        for name, value in self.last.items():
            self.gauges[name].set(value, tags=self.run)
        for phase, seconds in self.last_phases.items():
            self.phase.set(seconds, tags={**self.run, "phase": phase})
        for source, value in self.last_sources.items():
            self.source.set(value, tags={**self.run, "source": source})
        for actor, lag in lags.items():
            self.lag.set(float(lag), tags={**self.run, "actor": actor})
