"""Where each step's statistics go besides stats.jsonl: TensorBoard events, Weights & Biases.

``run.trackers`` names them (comma-separated); ``jsonl`` is always on. Every tracker gets the
statistics under the names of stats.jsonl (the reference trainer's) and a histogram of the
batch's rewards (``env/rewards``). A chosen tracker whose package is missing stops the run at
start with one line (:func:`check_trackers`), before Ray starts.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from learner.config import ConfigError

log = logging.getLogger(__name__)

# tracker -> (module it needs, how to install it)
KNOWN = {
    "jsonl": ("", ""),
    "tensorboard": ("tensorboard", "pip install tensorboard (or pip install -e '.[test]')"),
    "wandb": ("wandb", "pip install -e '.[wandb]'"),
}
WANDB_PROJECT = "ray-ppo-sentiment"


class Tracker(Protocol):
    def log(self, stats: dict[str, Any], rewards: list[float], step: int) -> None: ...

    def close(self) -> None: ...


def parse_trackers(spec: str) -> list[str]:
    """'jsonl,tensorboard' -> ['jsonl', 'tensorboard']; ConfigError for an unknown name."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in KNOWN:
            raise ConfigError(f"run.trackers: unknown tracker '{name}' (choose from {', '.join(KNOWN)})")
    return ["jsonl"] + [n for n in dict.fromkeys(names) if n != "jsonl"]


def check_trackers(names: list[str] | str) -> list[str]:
    """The tracker names, or ConfigError naming the first one whose package is not installed."""
    names = parse_trackers(names) if isinstance(names, str) else names
    for name in names:
        module, install = KNOWN[name]
        if module and importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.trackers: '{name}' needs the {module} package, which is not installed: {install}")
    return names


def open_trackers(names: list[str], folder: Path, run_name: str, config: dict[str, Any]) -> list[Tracker]:
    """The trackers other than jsonl (RunDir writes that itself), opened in the run directory."""
    out: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            out.append(TensorBoardTracker(folder / "tensorboard"))
        elif name == "wandb":
            out.append(WandbTracker(folder, run_name, config))
    return out


class TensorBoardTracker:
    """Event files in <run dir>/tensorboard: ``tensorboard --logdir runs/`` shows every run."""

    def __init__(self, folder: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def log(self, stats: dict[str, Any], rewards: list[float], step: int) -> None:
        for key, value in stats.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        if rewards:
            self.writer.add_histogram("env/rewards", np.asarray(rewards, dtype=np.float64), step)
        self.writer.flush()  # a run watched live shows each step as it ends

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """One W&B run per training run, named like the run directory, holding the resolved config.

    WANDB_MODE, WANDB_PROJECT, WANDB_ENTITY... are W&B's own settings; with WANDB_MODE=offline
    the run is written to <run dir>/wandb/offline-run-* for a later ``wandb sync``."""

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        # A resumed run continues the same W&B run (its id is the run directory's name).
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=run_name,
                              id=_wandb_id(run_name), resume="allow", dir=str(folder), config=config)

    def log(self, stats: dict[str, Any], rewards: list[float], step: int) -> None:
        row = {k: v for k, v in stats.items() if isinstance(v, (int, float))}
        if rewards:
            row["env/rewards"] = self.wandb.Histogram(np.asarray(rewards, dtype=np.float64))
        # W&B drops steps at or below one already logged (a resumed run redoes steps): warned, not fatal.
        self.run.log(row, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_id(run_name: str) -> str:
    # W&B run ids may not hold '/', '\\', '#', '?', '%' or ':'.
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in run_name)
