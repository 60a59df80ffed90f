"""learner.train's settings and reward arguments, without a run (the README's example runs in
tests/test_reward_e2e.py)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO
from learner.api import reward_functions, settings_of, train
from learner.config import Config, ConfigError, from_overrides
from rewards.sources import PYTHON_OBJECT


def test_settings_from_nested_dotted_and_alias_names() -> None:
    cfg = settings_of({"ppo": {"learning_rate": 3e-4}, "rollout.top_k": 5, "steps": 2, "batch-size": 16,
                       "ppo.mini_batch_size": 16, "reward": {"sources": [{"name": "s", "url": "http://x"}]}})
    assert (cfg.ppo.learning_rate, cfg.rollout.top_k, cfg.run.steps, cfg.ppo.batch_size) == (3e-4, 5, 2, 16)
    assert [s.name for s in cfg.reward.sources] == ["s"]
    given = Config()
    assert settings_of(given) == given and settings_of(given) is not given
    assert settings_of(None) == Config()


@pytest.mark.parametrize("config, says", [
    ({"ppo.learnin_rate": 1.0}, "did you mean 'ppo.learning_rate'"),
    ({"ppo": {"learning_rate": "fast"}}, "ppo.learning_rate: 'fast' is not a valid float"),
    ([("steps", 2)], "must be a Config or a dict"),
])
def test_bad_settings_are_one_line(config, says: str) -> None:
    with pytest.raises(ConfigError, match=says):
        settings_of(config)


def test_a_python_reward_becomes_the_one_source() -> None:
    cfg = Config()
    fn = lambda prompts, responses: [0.0] * len(prompts)  # noqa: E731
    functions = reward_functions(cfg, fn)
    assert cfg.reward.function == f"{PYTHON_OBJECT}:reward" and functions == {cfg.reward.function: fn}
    assert [s.name for s in cfg.reward.source_specs()] == ["reward"]
    with pytest.raises(ConfigError, match="not both"):
        reward_functions(from_overrides({"reward.url": "http://x"}), fn)
    with pytest.raises(ConfigError, match="must be a function"):
        reward_functions(Config(), 3.0)
    with pytest.raises(ConfigError, match="for reward.sources entries"):
        reward_functions(Config(), {"brevity": fn})


def test_named_python_rewards_for_a_mix() -> None:
    fn = lambda prompts, responses: [0.0] * len(prompts)  # noqa: E731
    cfg = settings_of({"reward": {"sources": [{"name": "b", "function": f"{PYTHON_OBJECT}:brevity"}]}})
    assert reward_functions(cfg, {"brevity": fn}) == {f"{PYTHON_OBJECT}:brevity": fn}


def test_resume_needs_a_run() -> None:
    with pytest.raises(ValueError, match="runs/no-such-run"):
        train({"run.resume": "runs/no-such-run"})


def test_importing_learner_stays_light() -> None:
    """``import learner`` (as ``python -m learner.main`` does first) loads no torch, ray or tyro."""
    code = "import sys, learner; print(sorted(m for m in ('torch', 'ray', 'tyro') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr
