"""Shared test fixtures: the stand-in models and data in ../shared, one Ray instance.

Tests never reach the model hub: HF_HUB_OFFLINE=1 makes a hub look-up fail at once
instead of after ~50 s of retries.
"""
from __future__ import annotations

import os
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
