"""The run directory: the resolved config, one JSON line per step, the batch's texts, and the
trackers a run is watched with (TensorBoard events when tensorboard is installed)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from learner.config import Config


class RunDir:
    """config.yaml, stats.jsonl (one line per step), rollouts.jsonl (the batch's texts and
    scores), TensorBoard events when tensorboard is installed, checkpoints/, policy/."""

    def __init__(self, cfg: Config) -> None:
        name = cfg.run.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.path = Path(cfg.run.out_dir) / name
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.stats_file = self.path / "stats.jsonl"
        self.rollouts_file = self.path / "rollouts.jsonl"
        self.tb = _tensorboard(self.path / "tensorboard")

    def log_step(self, stats: dict[str, Any], rollouts: dict[str, Any]) -> None:
        with self.stats_file.open("a") as f:
            f.write(json.dumps(stats) + "\n")
        with self.rollouts_file.open("a") as f:
            f.write(json.dumps(rollouts) + "\n")
        if self.tb is not None:
            for key, value in stats.items():
                self.tb.add_scalar(key, value, stats["step"])
            self.tb.add_histogram("env/rewards", np.asarray(rollouts["scores"]), stats["step"])
            self.tb.flush()

    def restore_logs(self, ckpt: Path) -> None:
        """Logs as they were at the checkpoint: the steps after it are about to be redone."""
        for name in ("stats.jsonl", "rollouts.jsonl"):
            (self.path / name).write_bytes((ckpt / name).read_bytes())


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # optional extra: pip install -e '.[tensorboard]'
        return None
    return SummaryWriter(str(folder))
