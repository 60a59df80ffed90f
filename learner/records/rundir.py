"""The run directory: the resolved config, one JSON line per step, the batch's texts, and the
trackers chosen by ``run.trackers`` (TensorBoard events, W&B; learner/records/trackers.py).

One driver at a time: a driver holds an exclusive lock on ``<run dir>/.lock`` for as long as it
uses the directory, and a new run refuses a directory that already holds a run (its logs or
checkpoints would be mixed with the new run's): it must be continued with ``--resume`` or
given another name."""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from pathlib import Path
from typing import IO, Any

import yaml

from learner.config import Config, ConfigError
from learner.records.checkpoint import LOGS, ROLLOUTS, STATS, tidy
from learner.records.trackers import check_trackers, open_trackers

LOCK = ".lock"


def run_path(cfg: Config) -> Path:
    """Where the run's directory is: run.out_dir / run.name, or a fresh timestamped name."""
    out_dir = Path(cfg.run.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"run.out_dir '{out_dir}' is a file, not a folder; pass a folder (--out-dir)")
    if cfg.run.name:
        return out_dir / cfg.run.name
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = out_dir / stamp, 1
    while path.exists():  # two runs started within one second each get their own directory
        n += 1
        path = out_dir / f"{stamp}-{n}"
    return path


def lock_run_dir(path: Path) -> IO:
    """The open, exclusively locked ``.lock`` file of a run directory (released when closed or
    when the process ends, however it ends); ConfigError if another driver holds it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = open(path / LOCK, "a+")
    except OSError as err:
        raise ConfigError(f"run directory '{path}' cannot be created ({err.strerror}); pass another --out-dir") from None
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "?"
        lock.close()
        raise ConfigError(f"run directory '{path}' is in use by another driver (pid {holder}); wait for it to end "
                          "or pass another --run.name") from None
    lock.seek(0)
    lock.truncate()
    lock.write(str(os.getpid()))
    lock.flush()
    return lock


def holds_a_run(path: Path) -> bool:
    """Whether a directory already holds a run's files (anything but the lock)."""
    return path.is_dir() and any(p.name != LOCK for p in path.iterdir())


class RunDir:
    """config.yaml, stats.jsonl (one line per step), rollouts.jsonl (the batch's texts and
    scores), tensorboard/ and wandb/ when those trackers are chosen, checkpoints/, policy/."""

    def __init__(self, cfg: Config) -> None:
        # A missing tracker package is a settings error: it stops the run before anything starts.
        trackers = check_trackers(cfg.run.trackers)
        self.path = run_path(cfg)
        if not cfg.run.resume and holds_a_run(self.path):  # checked before and after taking the lock
            raise _taken(self.path)
        self.lock = lock_run_dir(self.path)
        if not cfg.run.resume and holds_a_run(self.path):
            self.lock.close()
            raise _taken(self.path)
        try:
            tidy(self.path)
            config = cfg.to_dict()
            (self.path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            self.stats_file = self.path / STATS
            self.rollouts_file = self.path / ROLLOUTS
            self.trackers = open_trackers(trackers, self.path, self.path.name, config)
        except BaseException:
            self.lock.close()  # a driver that did not start holds nothing
            raise

    def log_step(self, stats: dict[str, Any], rollouts: dict[str, Any]) -> None:
        with self.stats_file.open("a") as f:
            f.write(json.dumps(stats) + "\n")
        with self.rollouts_file.open("a") as f:
            f.write(json.dumps(rollouts) + "\n")
        for tracker in self.trackers:
            tracker.log(stats, list(rollouts.get("scores", [])), int(stats["step"]))

    def close(self) -> None:
        """Flush and close the trackers (W&B marks its run finished); release the lock."""
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []
        self.lock.close()

    def log_bytes(self) -> dict[str, bytes]:
        """The logs so far, for a checkpoint."""
        return {name: (self.path / name).read_bytes() if (self.path / name).exists() else b"" for name in LOGS}

    def restore_logs(self, ckpt: Path | None) -> None:
        """Logs as they were at the checkpoint (None: the start of the run, empty): the steps
        after it are about to be redone."""
        for name in LOGS:
            (self.path / name).write_bytes((ckpt / name).read_bytes() if ckpt else b"")


def _taken(path: Path) -> ConfigError:
    return ConfigError(f"run directory '{path}' already holds a run: use --resume {path} to continue it, "
                       "or another --run.name")
