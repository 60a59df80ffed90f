"""Atomic checkpoints in the run directory, keeping the last K.

A checkpoint is a folder ``checkpoints/step-000010`` (10 steps done) holding
``learner.pt`` (weights, Adam, KL coefficient, RNGs), ``driver.json`` (next step, data
position, seed), ``stats.jsonl`` and ``rollouts.jsonl`` (the metrics so far) and, written
last, ``MANIFEST.json`` with every file's size and SHA-256. It is written under a temporary
name, fsynced, then renamed: a crash mid-write leaves a ``.tmp-*`` folder that is never
taken for a checkpoint, and a checkpoint whose files do not match its manifest is skipped
on resume with a message.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
PREFIX = "step-"


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def write(run_dir: Path, step: int, files: dict[str, bytes], keep_last: int) -> Path:
    """Write {name: bytes} as the checkpoint after ``step`` steps, atomically; prune old ones."""
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    manifest = {}
    for name, data in files.items():
        _write_synced(tmp / name, data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1).encode())
    if final.exists():  # a rerun of the same step after a resume replaces the old copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary folders are not checkpoints)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete and intact, else why not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest"
    for name, meta in manifest["files"].items():
        file = ckpt / name
        if not file.is_file():
            return f"{name} is missing"
        data = file.read_bytes()
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def find_resumable(path: Path) -> tuple[Path, Path, list[str]]:
    """(run dir, newest intact checkpoint, messages about skipped ones) for ``--resume PATH``.

    PATH is a run directory or one of its checkpoints; a corrupt newest checkpoint falls
    back to the one before it, saying so.
    """
    path = path.expanduser().resolve()
    if path.parent.name == "checkpoints" and path.name.startswith(PREFIX):
        run_dir, candidates = path.parent.parent, [path]
    else:
        run_dir, candidates = path, list_checkpoints(path)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"--resume: '{path}' is not a run directory or checkpoint (no config.yaml in {run_dir})")
    notes = []
    for ckpt in reversed(candidates):
        problem = verify(ckpt)
        if problem is None:
            return run_dir, ckpt, notes
        notes.append(f"checkpoint {ckpt.name} is corrupt ({problem}); falling back to an older one")
    raise CheckpointError(f"--resume: no intact checkpoint in {run_dir}" + (f" ({'; '.join(notes)})" if notes else ""))
