"""Nothing lost: a killed driver resumes exactly, dead actors are restarted and their work
redone, a corrupt checkpoint is skipped, and bad input stops with one line."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, DriverRun, run_driver

pytestmark = pytest.mark.e2e

# A small, fast run for the failure cases (they check recovery, not learning).
SMALL = ["--config", "configs/stand-in-quick.yaml", "--ppo.batch_size", "16", "--ppo.mini_batch_size", "16"]


def _start(args: list[str], out_dir: Path, name: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "learner.main", *args, "--out-dir", str(out_dir), "--run.name", name]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _read_until(proc: subprocess.Popen, marker: str, timeout: float) -> str:
    """Driver output up to the first line starting with ``marker`` (bounded)."""
    out, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        if line.startswith(marker):
            return "".join(out)
    proc.kill()
    raise AssertionError(f"no '{marker}' line within {timeout}s:\n" + "".join(out)[-3000:])


def test_killed_driver_resumes_with_identical_statistics(quick_run: DriverRun, tmp_path: Path):
    """SIGKILL the driver (and with it the learner actor) after step 5, resume, and compare
    every resumed step with the uninterrupted run of the same seed."""
    proc = _start(["--config", "configs/stand-in-quick.yaml", "--cluster.num_rollout_workers", "2",
                   "--run.checkpoint_every", "2"], tmp_path, "killed")
    try:
        _read_until(proc, "step 5/10", timeout=600)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    run_dir = tmp_path / "killed"
    resumed = run_driver(["--resume", str(run_dir)], tmp_path, "killed")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "resumed from" in resumed.output and "at step 5" in resumed.output  # checkpoint after step 4

    want = {s["step"]: s for s in quick_run.stats()}
    got = resumed.stats()
    assert [s["step"] for s in got] == list(range(10))
    for s in got[4:]:
        for key, value in want[s["step"]].items():
            if key.startswith(("time/", "samples_per", "tokens_per")):
                continue
            assert s[key] == pytest.approx(value, rel=1e-4, abs=1e-6), f"step {s['step']}: {key}"


def test_killed_rollout_and_reward_actors_are_restarted(tmp_path: Path):
    proc = _start([*SMALL, "--run.steps", "6", "--cluster.num_rollout_workers", "2"], tmp_path, "faults")
    try:
        _read_until(proc, "step 2/6", timeout=600)
        actors = json.loads((tmp_path / "faults" / "actors.json").read_text())
        os.kill(actors["rollout-1"]["pid"], signal.SIGKILL)
        _read_until(proc, "step 4/6", timeout=600)
        os.kill(actors["rewards-0"]["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=600)
    finally:
        proc.kill()
    assert proc.returncode == 0, out[-3000:]
    stats = DriverRun(tmp_path / "faults", 0, out).stats()
    assert [s["step"] for s in stats] == list(range(6))
    assert all(s["env/reward_mean"] == s["env/reward_mean"] for s in stats)
    assert stats[-1]["failures"] >= 2, "both kills should have been seen and recovered"
    rollouts = [json.loads(line) for line in (tmp_path / "faults" / "rollouts.jsonl").read_text().splitlines()]
    assert all(len(r["scores"]) == 16 for r in rollouts)  # full batches
    assert all(s["rollout/version_lag"] == 0 for s in stats)  # restarted actors got current weights


@pytest.fixture(scope="module")
def small_run(tmp_path_factory) -> DriverRun:
    out = tmp_path_factory.mktemp("small")
    run = run_driver([*SMALL, "--run.steps", "3", "--run.checkpoint_every", "1",
                      "--cluster.num_rollout_workers", "1"], out, "small")
    assert run.returncode == 0, run.output[-3000:]
    return run


def test_corrupt_newest_checkpoint_falls_back(small_run: DriverRun, tmp_path: Path):
    run_dir = tmp_path / "small"
    shutil.copytree(small_run.run_dir, run_dir)
    newest = run_dir / "checkpoints" / "step-000003" / "learner.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    resumed = run_driver(["--resume", str(run_dir), "--run.steps", "4"], tmp_path, "small")
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert "checkpoint step-000003 is corrupt (learner.pt does not match its checksum)" in resumed.output
    assert "step-000002 at step 3" in resumed.output
    assert [s["step"] for s in resumed.stats()] == [0, 1, 2, 3]


def test_half_written_checkpoint_is_never_taken(small_run: DriverRun, tmp_path: Path):
    from learner import checkpoint

    run_dir = tmp_path / "small"
    shutil.copytree(small_run.run_dir, run_dir)
    (run_dir / "checkpoints" / ".tmp-step-000004").mkdir()  # a crash mid-write leaves this
    assert checkpoint.find_resumable(run_dir)[1].name == "step-000003"
    (run_dir / "checkpoints" / "step-000003" / "MANIFEST.json").unlink()  # interrupted before the manifest
    assert checkpoint.find_resumable(run_dir)[1].name == "step-000002"


def test_non_finite_reward_stops_with_a_checkpoint(tmp_path: Path):
    run = run_driver([*SMALL, "--run.steps", "3", "--run.test_nan_reward_step", "1",
                      "--cluster.num_rollout_workers", "1"], tmp_path, "nan")
    assert run.returncode == 1
    last = run.output.strip().splitlines()[-1]
    assert last.startswith("error: non-finite reward at step 2; saved the last good state as"), run.output[-2000:]
    assert (run.run_dir / "checkpoints" / "step-000001" / "MANIFEST.json").is_file()
    assert "Traceback" not in run.output


# ----------------------------------------------------------------------------- bad input

def _bad(args: list[str], tmp_path: Path) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "learner.main", *args, "--out-dir", str(tmp_path)], cwd=REPO,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stderr


@pytest.fixture(scope="module")
def no_positive_model(tmp_path_factory, reward_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("no-positive")
    shutil.copytree(reward_dir, folder, dirs_exist_ok=True)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["id2label"], cfg["label2id"] = {"0": "BAD", "1": "GOOD"}, {"BAD": 0, "GOOD": 1}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.fixture(scope="module")
def textless_dataset(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("textless")
    pq.write_table(pa.table({"review": ["a long review " * 30] * 20}), folder / "train.parquet")
    return folder


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("tiny")
    pq.write_table(pa.table({"text": ["a long review " * 30] * 5}), folder / "train.parquet")
    return folder


@pytest.mark.parametrize("case, args, message, code", [
    ("unknown setting", ["--ppo.learnin_rate", "1e-3"], "unknown setting 'ppo.learnin_rate'; did you mean", 2),
    ("mistyped value", ["--ppo.ppo_epochs", "four"], "ppo.ppo_epochs: 'four' is not a valid int", 2),
    ("missing model folder", ["--policy", "/no/such/model"], "rollout.policy: '/no/such/model' does not exist", 2),
    ("missing dataset folder", ["--dataset", "./no/such/data"], "data.dataset: './no/such/data' does not exist", 2),
    ("no text column", ["--dataset", "{textless}"], "data.text_column: dataset", 2),
    ("too few rows", ["--dataset", "{tiny}"], "5 reviews longer than 200 characters, fewer than one batch", 2),
    ("beyond context", ["--rollout.response_max_tokens", "300"], "exceed the policy's context of 256 positions", 2),
    ("no POSITIVE label", ["--reward-model", "{nopos}"], "reward.positive_label: the reward model has no label", 2),
    ("more GPUs than exist", ["--cluster.learner_gpus", "2"], "asks for 2 GPUs", 1),
    ("impossible batch", ["--ppo.batch_size", "100"], "ppo.batch_size (100) must be a multiple", 2),
])
def test_bad_input_is_one_line(case, args, message, code, tmp_path, no_positive_model, textless_dataset,
                               tiny_dataset):
    args = [a.format(textless=textless_dataset, tiny=tiny_dataset, nopos=no_positive_model) for a in args]
    rc, err = _bad(["--config", "configs/stand-in-quick.yaml", *args], tmp_path)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == code, err[-2000:]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
