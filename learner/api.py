"""``learner.train``: a training run from a notebook or a script, as ``python -m learner.main``.

The settings are the config dataclasses (``learner.config.Config``) or a dict with the flags'
names, nested by section or dotted (``{"ppo": {"learning_rate": 3e-4}}``,
``{"ppo.learning_rate": 3e-4}``, the short aliases too: ``{"steps": 2}``); a YAML file's
``reward.sources`` list fits the same dict. ``reward`` is a Python reward function
``reward(prompts, responses) -> one float per pair`` used instead of the classifier, or a dict
{name: function} that ``reward.sources`` entries name as ``function: "<python>:name"``. Ray
pickles these by value where the reward actor cannot import them (a lambda, a notebook's
function), by reference otherwise (a module the reward actor imports from the working
directory or PYTHONPATH). ``{"run.resume": RUN_DIR}`` continues a run as ``--resume`` does
(give a Python reward again). Bad settings raise ``ConfigError`` (one line) before Ray starts.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from learner.config import (ALIASES, Config, ConfigError, _check_resumable_changes, _flatten, _resumable,
                            _resumed_settings, from_overrides, resolve_local_paths)
from rewards.sources import PYTHON_OBJECT, RewardFunction


def settings_of(config: Config | Mapping[str, Any] | None) -> Config:
    """A Config from the dataclasses (copied), a nested or dotted dict of the flags' names, or None
    (the recipe's defaults); not yet validated. With run.resume in the dict, the run's saved
    settings are the base, as on the command line, and what the checkpoint fixes cannot change."""
    if config is None:
        return Config()
    if isinstance(config, Config):
        return copy.deepcopy(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"learner.train: config must be a Config or a dict of settings, not a {type(config).__name__}")
    flat = {}
    for name, value in _flatten(dict(config)).items():
        flat[ALIASES.get(name.replace("_", "-"), name.replace("-", "_"))] = value
    if not flat.get("run.resume"):
        return from_overrides(flat, validate=False)
    resumed = _resumable(str(flat["run.resume"]))  # (run directory, its checkpoint's manifest)
    saved = _resumed_settings(resumed[0] / "config.yaml")
    cfg = from_overrides({**saved, **flat}, validate=False)
    _check_resumable_changes(cfg, saved, *resumed, {n for n in ("run.out_dir", "run.name") if n in flat})
    return cfg


def reward_functions(cfg: Config, reward: RewardFunction | Mapping[str, RewardFunction] | None) -> dict:
    """The Python reward functions by the reward.function strings that name them; a single
    function becomes the reward (reward.function set to name it)."""
    if reward is None:
        return {}
    if isinstance(reward, Mapping):
        named = {f"{PYTHON_OBJECT}:{name}": fn for name, fn in reward.items()}
        used = {s.function for s in cfg.reward.sources}
        if not cfg.reward.sources or not set(named) <= used:
            raise ConfigError(f"learner.train: reward={{name: function}} is for reward.sources entries that say "
                              f"function: \"{PYTHON_OBJECT}:name\"; unused: {sorted(set(named) - used)}")
        return named
    if not callable(reward):
        raise ConfigError(f"learner.train: reward must be a function (prompts, responses) -> floats, "
                          f"not a {type(reward).__name__}")
    name = getattr(reward, "__name__", "")
    spec = f"{PYTHON_OBJECT}:{name if name.isidentifier() else 'reward'}"  # a lambda: 'reward'
    # A resumed run's saved settings already name it.
    if cfg.reward.function != spec and (cfg.reward.function or cfg.reward.url or cfg.reward.sources):
        raise ConfigError("learner.train: give the reward as reward= or as reward.function/url/sources, not both")
    cfg.reward.function = spec
    return {spec: reward}


def train(config: Config | Mapping[str, Any] | None = None, *,
          reward: Callable | Mapping[str, Callable] | None = None) -> Path:
    """Train with these settings (and Python reward) and return the run directory."""
    from learner.orchestration.driver import train as run

    cfg = settings_of(config)
    functions = reward_functions(cfg, reward)
    return run(resolve_local_paths(cfg.validate()), functions or None)
