"""End-to-end runs of the reward kinds on the stand-ins: a mix of a Python function and an HTTP
endpoint this test serves on localhost, a function that raises in step 2, and the README's
``learner.train`` example.

    HF_HUB_OFFLINE=1 python -m pytest tests/test_reward_e2e.py -q
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, DriverRun, run_driver
from learner.records import checkpoint
from reward_functions import BATCH, Endpoint, response_chars

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

MIX_STEPS = 6
WEIGHTS = {"the": 1.0, "chars": 0.5}


def settings_file(folder: Path, policy_dir: Path, imdb_dir: Path, reward: dict, **sections: dict) -> Path:
    """The quick config with these reward settings and sections, as a YAML file."""
    tree = yaml.safe_load((REPO / "configs" / "stand-in-quick.yaml").read_text())
    tree["rollout"]["policy"], tree["data"]["dataset"], tree["reward"] = str(policy_dir), str(imdb_dir), reward
    for name, values in sections.items():
        tree.setdefault(name, {}).update(values)
    path = folder / "settings.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def mix_run(tmp_path_factory, policy_dir: Path, imdb_dir: Path) -> tuple[DriverRun, int]:
    """A mix of the_count (a function) and response_chars (served over HTTP from this process),
    6 steps of the quick config, with TensorBoard; and how many requests the endpoint answered."""
    out = tmp_path_factory.mktemp("reward-mix")
    endpoint = Endpoint(response_chars)
    try:
        reward = {"sources": [{"name": "the", "weight": WEIGHTS["the"], "function": "tests.reward_functions:the_count"},
                              {"name": "chars", "weight": WEIGHTS["chars"], "url": endpoint.url}]}
        config = settings_file(out, policy_dir, imdb_dir, reward,
                               run={"steps": MIX_STEPS, "report_queries": 0, "trackers": "jsonl,tensorboard"})
        run = run_driver(["--config", str(config)], out, "mix")
    finally:
        endpoint.close()
    assert run.returncode == 0, run.output[-3000:]
    return run, endpoint.requests


def test_function_reward_rises(mix_run) -> None:
    """The function source (how often "the" occurs in a response) rises within 6 steps.

    Rise = mean of env/reward/the over the last 2 of 6 steps - over the first 2, measured over
    seeds 0-2 on an AMD EPYC (2 cores): 1.81, 1.48, 1.52 (mean 1.60, sd 0.18). Float results
    differ between CPUs, which at worst is another draw of the sampled tokens, so the seed spread
    bounds what another machine sees: the threshold, 0.5, lies about 1 below the lowest seed and
    6 sd below the mean."""
    run, _ = mix_run
    the = [s["env/reward/the"] for s in run.stats()]
    assert len(the) == MIX_STEPS
    first, last = sum(the[:2]) / 2, sum(the[-2:]) / 2
    assert last > first + 0.5, f"env/reward/the did not rise: first 2 steps {first:.3f}, last 2 {last:.3f}"


def test_http_source_scored_every_step(mix_run) -> None:
    run, requests = mix_run
    chars = [s["env/reward/chars"] for s in run.stats()]
    assert len(chars) == MIX_STEPS and all(0 < c < 2 for c in chars)  # len(response) / 100, 4-15 tokens
    assert requests >= MIX_STEPS  # at least one merged pass per step


def test_mix_statistics_in_stats_and_tensorboard(mix_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = mix_run
    for s in run.stats():
        # the mean of the weighted sums is the weighted sum of the means (the learner's mean is fp32)
        assert s["env/reward_mean"] == pytest.approx(sum(w * s[f"env/reward/{n}"] for n, w in WEIGHTS.items()),
                                                     rel=1e-5, abs=1e-6)
    for line in (run.run_dir / "rollouts.jsonl").read_text().splitlines():
        rollout = json.loads(line)
        assert set(rollout["sources"]) == set(WEIGHTS)
        for i, score in enumerate(rollout["scores"]):  # each text's reward is its sources' weighted sum
            assert score == pytest.approx(sum(w * rollout["sources"][n][i] for n, w in WEIGHTS.items()), abs=1e-9)
    events = EventAccumulator(str(run.run_dir / "tensorboard")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"env/reward_mean", "env/reward/the", "env/reward/chars"} <= tags, tags
    assert len(events.Scalars("env/reward/the")) == MIX_STEPS


def test_mix_is_recorded_for_resume(mix_run) -> None:
    """The checkpoint's manifest holds the mix (plain JSON); a resume keeps it and refuses another."""
    from learner.api import settings_of
    from learner.config import ConfigError

    run, _ = mix_run
    cfg = settings_of({"run.resume": str(run.run_dir), "run.steps": MIX_STEPS + 1})
    assert [(s.name, s.weight) for s in cfg.reward.sources] == list(WEIGHTS.items())
    changed = [{"name": "the", "weight": 2.0, "function": "tests.reward_functions:the_count"}]
    with pytest.raises(ConfigError, match="reward.sources cannot change on --resume"):
        settings_of({"run.resume": str(run.run_dir), "reward": {"sources": changed}})


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory, policy_dir: Path, imdb_dir: Path) -> DriverRun:
    """A function reward that raises in step 2 of 3, with a checkpoint after every step (so the
    state before step 2 is already saved and is not written again)."""
    out = tmp_path_factory.mktemp("reward-fails")
    config = settings_file(out, policy_dir, imdb_dir, {"function": "tests.reward_functions:fails_in_step_two"},
                           ppo={"batch_size": BATCH, "mini_batch_size": BATCH},
                           cluster={"num_rollout_workers": 1, "learner_processes": 1},
                           run={"steps": 3, "checkpoint_every": 1, "report_queries": 0})
    return run_driver(["--config", str(config)], out, "fails")


def test_raising_reward_stops_the_run_with_one_line(failing_run: DriverRun) -> None:
    assert failing_run.returncode == 1, failing_run.output[-3000:]
    errors = [line for line in failing_run.output.splitlines() if line.startswith("error:")]
    assert errors == ["error: step 2: reward source 'fails_in_step_two' raised ZeroDivisionError: the reward broke "
                      "on purpose; the last good checkpoint is step 1"], failing_run.output[-3000:]
    assert "Traceback" not in failing_run.output


def test_raising_reward_keeps_the_last_good_checkpoint(failing_run: DriverRun) -> None:
    ckpts = checkpoint.list_checkpoints(failing_run.run_dir)
    assert [c.name for c in ckpts] == ["step-000001"]
    assert checkpoint.verify(ckpts[0]) is None
    assert len(failing_run.stats()) == 1


def test_python_api_resumes_the_failed_run_with_its_settings(failing_run: DriverRun) -> None:
    """learner.train({"run.resume": RUN_DIR}) takes the run's saved settings as --resume does
    (checked here without running it again); what the checkpoint fixes cannot change."""
    from learner.api import settings_of
    from learner.config import ConfigError

    cfg = settings_of({"run.resume": str(failing_run.run_dir), "run.steps": 5})
    assert cfg.reward.function == "tests.reward_functions:fails_in_step_two" and cfg.run.steps == 5
    assert (cfg.run.out_dir, cfg.run.name) == (str(failing_run.run_dir.parent), "fails")
    with pytest.raises(ConfigError, match="reward.function cannot change on --resume"):
        settings_of({"run.resume": str(failing_run.run_dir), "reward.function": "tests.reward_functions:the_count"})


def readme_example() -> str:
    """The Python block of the README's "From Python" section."""
    section = (REPO / "README.md").read_text().split("### From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_api_example_runs(tmp_path: Path, shared_dir: Path) -> None:
    """The example as written, from a folder beside ../shared as the checkout is (its run
    directory lands in that folder's runs/); the reward function travels to the reward actor by value."""
    work = tmp_path / "checkout"
    work.mkdir()
    (tmp_path / "shared").symlink_to(shared_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", readme_example()], cwd=work, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    run_dir = Path(proc.stdout.strip().splitlines()[-1])
    assert run_dir.parent == work / "runs"
    stats = DriverRun(run_dir, 0, "").stats()
    assert len(stats) == 2 and all("env/reward/says_great" in s for s in stats)
    assert (run_dir / "policy").is_dir()


def test_evaluation_logs_each_sources_mean(quick_run: DriverRun) -> None:
    """run.eval_every: each reward source's mean on the held-out prompts, beside eval/reward_mean
    (the recipe's one source, weight 1: the same mean)."""
    rows = [s for s in quick_run.stats() if "eval/reward_mean" in s]
    assert rows
    for s in rows:
        assert s["eval/reward/model"] == pytest.approx(s["eval/reward_mean"], abs=1e-9)
    assert all("eval/reward/model" not in s for s in quick_run.stats() if "eval/reward_mean" not in s)
