"""Shared test fixtures: the stand-in models and data in ../shared, one Ray instance.

Tests never reach the model hub: HF_HUB_OFFLINE=1 makes a hub look-up fail at once
instead of after ~50 s of retries.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared")).resolve()
POLICY_DIR = SHARED / "models" / "gpt2-imdb-mini"
REWARD_DIR = SHARED / "models" / "distilbert-imdb-mini"
IMDB_DIR = SHARED / "data" / "imdb"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"stand-ins not found at {SHARED}: set SHARED_DIR to the shared/ folder")
    return SHARED


@pytest.fixture(scope="session")
def policy_dir(shared_dir: Path) -> Path:
    return POLICY_DIR


@pytest.fixture(scope="session")
def reward_dir(shared_dir: Path) -> Path:
    return REWARD_DIR


@pytest.fixture(scope="session")
def imdb_dir(shared_dir: Path) -> Path:
    return IMDB_DIR


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the whole session (a start costs ~5 s).

    Logical resources are declared, not detected: 2 cores must host several actors
    that mostly wait, so they ask for num_cpus=0 and the CPU count here is generous.
    """
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=8, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 object_store_memory=300 * 1024**2)
    yield ray
    ray.shutdown()


@dataclass
class DriverRun:
    """One finished run of the real entry point."""

    run_dir: Path
    returncode: int
    output: str

    def stats(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "stats.jsonl").read_text().splitlines()]


def run_driver(args: list[str], out_dir: Path, name: str, timeout: float = 900, env: dict | None = None) -> DriverRun:
    """``python -m learner.main ARGS`` as a user would run it, from the repo root."""
    cmd = [sys.executable, "-m", "learner.main", *args, "--out-dir", str(out_dir), "--run.name", name]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return DriverRun(out_dir / name, proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, shared_dir) -> DriverRun:
    """The stand-in quick config with 2 rollout actors, run once for every test that reads it."""
    out = tmp_path_factory.mktemp("runs")
    run = run_driver(["--config", "configs/stand-in-quick.yaml", "--cluster.num_rollout_workers", "2"],
                     out, "quick")
    assert run.returncode == 0, run.output[-3000:]
    return run
