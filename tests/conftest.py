"""Shared test fixtures: the stand-in models and data in ../shared, one Ray instance.

Tests never reach the model hub: HF_HUB_OFFLINE=1 makes a hub look-up fail at once
instead of after ~50 s of retries.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The `ray` CLI and the `python` of `ray job submit` entrypoints are this interpreter's,
# whether or not its virtual environment was activated.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

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
    metrics: str = ""  # Prometheus text scraped during the run, where the fixture did

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
    """The stand-in quick config with 2 rollout actors, run once for every test that reads it.

    While it runs, the Prometheus text that Ray exports on this machine is scraped once the
    project's metrics appear (the metrics ports are listed in the service discovery file in
    Ray's session folder; RAY_TMPDIR gives the run its own, short, Ray folder)."""
    out = tmp_path_factory.mktemp("runs")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # unix socket paths must stay short
    cmd = [sys.executable, "-m", "learner.main", "--config", "configs/stand-in-quick.yaml",
           "--cluster.num_rollout_workers", "2", "--out-dir", str(out), "--run.name", "quick"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    metrics = ""
    try:
        for line in proc.stdout:
            lines.append(line)
            if not metrics and line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 2:
                metrics = scrape_ray_metrics(ray_tmp, want=("ray_ppo_reward_mean", "ray_ppo_reward_batch_size"),
                                             timeout=60)
        proc.wait(timeout=900)
    finally:
        proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    run = DriverRun(out / "quick", proc.returncode, "".join(lines), metrics)
    assert run.returncode == 0, run.output[-3000:]
    return run


def scrape_ray_metrics(ray_tmp: Path, want: tuple[str, ...], timeout: float) -> str:
    """Prometheus text of every metrics port listed in Ray's service discovery file, once
    every name in ``want`` shows up (each process exports every few seconds). Read through loopback."""
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        for sd in ray_tmp.glob("ray/session_latest/prom_metrics_service_discovery.json"):
            try:
                targets = json.loads(sd.read_text())[0]["targets"]
            except (ValueError, IndexError, KeyError, OSError):
                continue
            text = ""
            for target in targets:
                port = target.rsplit(":", 1)[1]
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                        text += resp.read().decode()
                except OSError:
                    pass
            if all(name in text for name in want):
                return text
        time.sleep(2)
    return text
