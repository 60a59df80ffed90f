"""The run directory: the resolved config, one JSON line per step, the batch's texts, and the
trackers chosen by ``run.trackers`` (TensorBoard events, W&B; learner/records/trackers.py)."""
from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Any

import yaml

from learner.config import Config
from learner.records.checkpoint import LOGS, ROLLOUTS, STATS
from learner.records.trackers import check_trackers, open_trackers


class RunDir:
    """config.yaml, stats.jsonl (one line per step), rollouts.jsonl (the batch's texts and
    scores), tensorboard/ and wandb/ when those trackers are chosen, checkpoints/, policy/."""

    def __init__(self, cfg: Config) -> None:
        # A missing tracker package is a settings error: it stops the run before anything starts.
        trackers = check_trackers(cfg.run.trackers)
        name = cfg.run.name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.path = Path(cfg.run.out_dir) / name
        self.path.mkdir(parents=True, exist_ok=True)
        config = cfg.to_dict()
        (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.stats_file = self.path / STATS
        self.rollouts_file = self.path / ROLLOUTS
        self.trackers = open_trackers(trackers, self.path, name, config)

    def log_step(self, stats: dict[str, Any], rollouts: dict[str, Any]) -> None:
        with self.stats_file.open("a") as f:
            f.write(json.dumps(stats) + "\n")
        with self.rollouts_file.open("a") as f:
            f.write(json.dumps(rollouts) + "\n")
        for tracker in self.trackers:
            tracker.log(stats, list(rollouts.get("scores", [])), int(stats["step"]))

    def close(self) -> None:
        """Flush and close the trackers (W&B marks its run finished)."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []

    def log_bytes(self) -> dict[str, bytes]:
        """The logs so far, for a checkpoint."""
        return {name: (self.path / name).read_bytes() if (self.path / name).exists() else b"" for name in LOGS}

    def restore_logs(self, ckpt: Path | None) -> None:
        """Logs as they were at the checkpoint (None: the start of the run, empty): the steps
        after it are about to be redone."""
        for name in LOGS:
            (self.path / name).write_bytes((ckpt / name).read_bytes() if ckpt else b"")
