"""Shared test fixtures: the stand-in models and data in ../shared, one Ray instance.

Tests never reach the model hub: HF_HUB_OFFLINE=1 makes a hub look-up fail at once
instead of after ~50 s of retries.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
def tiny_policy(tmp_path_factory, shared_dir: Path) -> Path:
    """A randomly initialised 2-layer GPT-2 saved with a real tokenizer (the golden case's), no value head."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tok = AutoTokenizer.from_pretrained(SHARED / "reference" / "ppo-golden" / "case1" / "policy")
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


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
    # What the quick run's fixture saw while the run was live (tests/test_monitoring.py):
    prometheus: Any = None  # tests/promserver.Prometheus that scraped the run (still serving its data)
    live_at: float = 0.0  # a unix time when the run was live and Prometheus had its metrics
    started_at: float = 0.0  # unix times the driver started and ended
    ended_at: float = 0.0
    dashboard: dict = field(default_factory=dict)  # dashboard API answers: see dashboard_checks
    ray_metrics_dir: Path | None = None  # a copy of Ray's session metrics/ folder (Prometheus, Grafana files)

    def stats(self) -> list[dict]:
        return [json.loads(line) for line in (self.run_dir / "stats.jsonl").read_text().splitlines()]


def run_driver(args: list[str], out_dir: Path, name: str, timeout: float = 900, env: dict | None = None) -> DriverRun:
    """``python -m learner.main ARGS`` as a user would run it, from the repo root."""
    cmd = [sys.executable, "-m", "learner.main", *args, "--out-dir", str(out_dir), "--run.name", name]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    return DriverRun(out_dir / name, proc.returncode, proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def prometheus(tmp_path_factory):
    """A Prometheus server (tests/promserver.py) that the quick run's fixture starts on Ray's
    scrape config; stopped at the end of the session. Its ``error`` says why there is none."""
    from promserver import Prometheus

    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


# The quick run scores 64 held-out prompts with the weights after steps 0 and 5 (eval/reward_mean);
# a run compared with it step for step takes the same flags.
QUICK_EVAL = ["--run.eval_every", "5", "--data.eval_prompts", "64"]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory, shared_dir, prometheus) -> DriverRun:
    """The stand-in quick config with 2 rollout actors, run once for every test that reads it.

    It runs as a user watching it would: TensorBoard (and W&B offline, when wandb is
    installed) as trackers, a real Prometheus started with the README's command on the
    scrape config Ray writes into its session folder, and the dashboard told where it is
    (RAY_PROMETHEUS_HOST). Once the project's metrics appear, the fixture scrapes Ray's
    Prometheus text itself (the ports are in the service discovery file in Ray's session
    folder; RAY_TMPDIR gives the run its own, short, Ray folder), asks the dashboard's API
    for the actors with and without the run's token (a fresh one, not ~/.ray/auth_token),
    and notes a moment when Prometheus had the run's metrics (``live_at``)."""
    import importlib.util

    out = tmp_path_factory.mktemp("runs")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # unix socket paths must stay short
    token = secrets.token_hex(32)
    (ray_tmp / "auth_token").write_text(token)
    (ray_tmp / "auth_token").chmod(0o600)
    trackers = "jsonl,tensorboard" + (",wandb" if importlib.util.find_spec("wandb") else "")
    cmd = [sys.executable, "-m", "learner.main", "--config", "configs/stand-in-quick.yaml", *QUICK_EVAL,
           "--cluster.num_rollout_workers", "2", "--out-dir", str(out), "--run.name", "quick",
           "--run.trackers", trackers]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": str(ray_tmp),
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ray_tmp / "auth_token"),
           "RAY_PROMETHEUS_HOST": prometheus.url, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           # Ray's processes report metrics every 2 s instead of 10 s, so each of Prometheus's 10 s
           # scrapes of this short run (10 fast steps) sees fresh values and the panels' rate()
           # windows hold changing samples.
           "RAY_metrics_report_interval_ms": "2000"}
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    metrics, live_at, dashboard, dashboard_url, metrics_dir = "", 0.0, {}, "", None
    try:
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ray dashboard: "):
                dashboard_url = line.split()[2]
                prometheus.start(ray_tmp / "ray")
            if not metrics and line.startswith("step ") and int(line.split()[1].split("/")[0]) >= 2:
                metrics = scrape_ray_metrics(ray_tmp, want=("ray_ppo_reward_mean", "ray_ppo_reward_batch_size",
                                                             "ray_ppo_eval_reward_mean"),
                                             timeout=60)
                dashboard = dashboard_checks(dashboard_url, token)
                if not prometheus.error:  # Ray's 10 s scrape interval, on a busy machine
                    live_at = prometheus.wait_for(("ray_ppo_step", "ray_ppo_reward_batch_size_count"), timeout=90)
        proc.wait(timeout=900)
        if (ray_tmp / "ray" / "session_latest" / "metrics").is_dir():
            metrics_dir = out / "ray-metrics"
            shutil.copytree(ray_tmp / "ray" / "session_latest" / "metrics", metrics_dir, symlinks=True)
    finally:
        proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    run = DriverRun(out / "quick", proc.returncode, "".join(lines), metrics, prometheus=prometheus, live_at=live_at,
                    started_at=started, ended_at=time.time(), dashboard=dashboard, ray_metrics_dir=metrics_dir)
    assert run.returncode == 0, run.output[-3000:]
    return run


def dashboard_get(url: str, path: str, token: str | None, timeout: float = 30) -> tuple[int, Any]:
    """(HTTP status, JSON reply or text) of a GET on the Ray dashboard, with ``Authorization:
    Bearer <token>`` unless token is None (what ``ray`` clients and the dashboard's own page send)."""
    req = urllib.request.Request(url + path)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read().decode())
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(errors="replace")


def dashboard_checks(url: str, token: str) -> dict:
    """The dashboard API's answers for the live run: its actors (state API, with the token) and
    the statuses without a token and with a wrong one."""
    if not url.startswith("http"):
        return {"error": f"no dashboard URL printed ({url!r})"}
    path = "/api/v0/actors?limit=1000&detail=true&timeout=20"
    status, reply = dashboard_get(url, path, token)
    actors = reply["data"]["result"]["result"] if status == 200 else []
    return {"url": url, "status": status, "actors": actors, "reply": reply if status != 200 else "",
            "status_without_token": dashboard_get(url, path, None)[0],
            "status_wrong_token": dashboard_get(url, path, "not-the-token")[0]}


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
