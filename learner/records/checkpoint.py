"""Atomic checkpoints in the run directory that hold data only, never code; the last K kept.

A checkpoint is a folder ``checkpoints/step-000010`` (10 steps done) holding

- ``learner.safetensors``: weights, Adam's moments and the torch RNG;
- ``learner.json``: KL coefficient, numpy RNG, weight version, Adam's settings;
- ``driver.json``: steps done, data position, seed;
- ``prefetch.json`` (``ppo.max_lag=1`` only): the batch generated during the last update and
  not yet trained on, so a resumed run trains on the very same samples;
- ``stats.jsonl`` and ``rollouts.jsonl``: the logs so far;
- written last, ``MANIFEST.json``: every file above with its size and SHA-256, and the run's
  invariants (the settings a resume cannot change: ``config.FROZEN_ON_RESUME``).

Nothing in a checkpoint is unpickled: a file that is not one of these names, a manifest that
does not list every file needed, a missing file, a wrong checksum, an unreadable
safetensors header or a JSON file without the fields (and types) its reader needs makes the
checkpoint unusable, said in one line, and the one before it is taken. A checkpoint is written under a temporary name of its writer's own, fsynced, then
renamed: a crash mid-write leaves a ``.tmp-*`` folder that is never taken for a checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from learner.core.state import LEARNER_META, LEARNER_TENSORS

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
PREFIX = "step-"
STATS, ROLLOUTS = "stats.jsonl", "rollouts.jsonl"
LOGS = (STATS, ROLLOUTS)
"""The run directory's logs (one JSON line per step each); a checkpoint holds them as they were."""
REQUIRED = (LEARNER_TENSORS, LEARNER_META, "driver.json", *LOGS)
OPTIONAL = ("prefetch.json",)


class CheckpointError(ValueError):
    """No usable checkpoint where one was asked for."""


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


# ----------------------------------------------------------------------------- files

def write(run_dir: Path, step: int, files: dict[str, bytes], keep_last: int,
          invariants: dict[str, Any] | None = None) -> Path:
    """Write {name: bytes} as the checkpoint after ``step`` steps, atomically; prune old ones.

    ``invariants`` (what a resume cannot change: models, data, batch shape, seed, actor counts)
    go into the manifest, which resume compares with the settings asked for. The files go to a
    temporary folder of this writer's own; a checkpoint of the same step is replaced only once
    the new one is complete."""
    unknown = sorted(set(files) - set(REQUIRED) - set(OPTIONAL))
    if unknown or not set(REQUIRED) <= set(files):
        raise ValueError(f"checkpoint files {sorted(files)}: need {REQUIRED}, may add {OPTIONAL}")
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    manifest = {}
    for name, data in files.items():
        _write_synced(tmp / name, data)
        manifest[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_synced(tmp / MANIFEST, json.dumps({"step": step, "files": manifest, "invariants": invariants or {}},
                                             indent=1).encode())
    old = None
    if final.exists():  # a rerun of the same step after a resume: the old copy goes once the new one is whole
        old = root / f".old-{tmp.name[len('.tmp-'):]}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    for stale in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def tidy(run_dir: Path) -> None:
    """Leftovers of a writer that stopped mid-write, removed by the driver holding the run
    directory's lock (no other writer can be at work): a ``.tmp-*`` folder is dropped; an
    ``.old-*`` copy whose replacement never got its name is put back."""
    root = checkpoint_dir(run_dir)
    for leftover in sorted(root.glob(".old-*")) if root.is_dir() else []:
        final = root / leftover.name[len(".old-"):].rsplit("-", 2)[0]
        if not final.exists():
            os.replace(leftover, final)
        else:
            shutil.rmtree(leftover, ignore_errors=True)
    for leftover in root.glob(".tmp-*") if root.is_dir() else []:
        shutil.rmtree(leftover, ignore_errors=True)


def manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest of a checkpoint that ``verify`` passed: step, files, invariants."""
    return json.loads((ckpt / MANIFEST).read_text())


def read(ckpt: Path) -> dict[str, bytes]:
    """The files of a checkpoint that ``verify`` passed, by name."""
    names = json.loads((ckpt / MANIFEST).read_text())["files"]
    return {name: (ckpt / name).read_bytes() for name in names}


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


def _manifest_files(ckpt: Path) -> dict[str, Any] | str:
    """The manifest's {name: {bytes, sha256}}, or why it is unusable."""
    try:
        files = json.loads((ckpt / MANIFEST).read_text())["files"]
    except (OSError, ValueError, TypeError, KeyError):
        return "no readable manifest"
    if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
            for m in files.values()):
        return "malformed manifest"
    unknown = sorted(set(files) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        return f"unexpected file {unknown[0]}: a checkpoint holds only safetensors and JSON"
    missing = [name for name in REQUIRED if name not in files]
    if missing:
        return f"the manifest does not list {missing[0]}"
    return files


def verify(ckpt: Path) -> str | None:
    """None if the checkpoint is complete, intact, holds only data and each JSON file has the
    fields the driver and learner read, else why not (one line)."""
    files = _manifest_files(ckpt)
    if isinstance(files, str):
        return files
    for name, meta in files.items():
        file = ckpt / name
        if not file.is_file():
            return f"{name} is missing"
        data = file.read_bytes()
        if len(data) != meta["bytes"] or hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return f"{name} does not match its checksum"
        if not _readable(name, file, data):
            return f"{name} is not valid {'safetensors' if name.endswith('.safetensors') else 'JSON'}"
        problem = _schema_problem(name, json.loads(data)) if name in SCHEMAS else None
        if name == "prefetch.json" and not problem:
            problem = _rollouts_problem(json.loads(data)["rollouts"])
        if problem:
            return f"{name} {problem}"
    step = json.loads((ckpt / "driver.json").read_bytes())["step"]
    if ckpt.name != f"{PREFIX}{step:06d}":
        return f"driver.json says {step} steps, the folder's name another"
    return None


_INT, _LIST, _DICT = (int,), (list,), (dict,)
# The fields each JSON file of a checkpoint must hold (more are allowed), and their types.
SCHEMAS: dict[str, dict[str, Any]] = {
    "driver.json": {"step": _INT, "data": {"epoch": _INT, "position": _INT}, "seed": _INT},
    LEARNER_META: {"kl_coef": (int, float), "numpy_rng": _DICT, "version": _INT, "aliases": _DICT,
                   "optimizer_param_groups": _LIST, "optimizer_scalars": _DICT},
    "prefetch.json": {"queries": _LIST, "rollouts": _LIST},
}


def _rollouts_problem(rollouts: list) -> str | None:
    from dataclasses import fields

    from actors.rollout import Rollout

    want = {f.name for f in fields(Rollout)}
    for i, r in enumerate(rollouts):
        if not isinstance(r, dict) or set(r) != want:
            return f"has rollouts[{i}] without the fields of a Rollout"
    return None


def _schema_problem(name: str, value: Any, schema: dict[str, Any] | None = None, where: str = "") -> str | None:
    """Why ``value`` does not fit the file's schema (a missing field, a wrong type), or None."""
    schema = SCHEMAS[name] if schema is None else schema
    if not isinstance(value, dict):
        return f"holds {type(value).__name__} where {where or 'the file'} must be an object"
    extra = sorted(set(value) - set(schema)) if where else []  # a nested object is built from exactly its fields
    if extra:
        return f"has the unexpected field '{where}{extra[0]}'"
    for key, want in schema.items():
        field = f"{where}{key}"
        if key not in value:
            return f"lacks the field '{field}'"
        if isinstance(want, dict):
            problem = _schema_problem(name, value[key], want, field + ".")
            if problem:
                return problem
        elif not isinstance(value[key], want) or isinstance(value[key], bool) or \
                want is _INT and value[key] < 0:
            return f"has '{field}' = {str(value[key])[:40]!r}, not a {'non-negative int' if want is _INT else want[0].__name__}"
    return None


def _readable(name: str, file: Path, data: bytes) -> bool:
    """JSON parses; a safetensors header parses (its tensors are read only by the learner)."""
    try:
        if name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                f.keys()
    except Exception:  # noqa: BLE001 - any parse failure: the checkpoint is unusable, whatever the library raised
        return False
    return True


def newest_good(run_dir: Path, candidates: list[Path] | None = None) -> tuple[Path | None, list[str]]:
    """(newest usable checkpoint or None, one line per newer one skipped and why)."""
    notes = []
    for ckpt in reversed(list_checkpoints(run_dir) if candidates is None else candidates):
        problem = verify(ckpt)
        if problem is None:
            return ckpt, notes
        notes.append(f"checkpoint {ckpt.name} is unusable ({problem}); falling back to an older one")
    return None, notes


def find_resumable(path: Path) -> tuple[Path, Path, list[str]]:
    """(run dir, newest usable checkpoint, messages about skipped ones) for ``--resume PATH``.

    PATH is a run directory or one of its checkpoints; an unusable newest checkpoint falls
    back to the one before it, saying so.
    """
    path = path.expanduser().resolve()
    if path.parent.name == "checkpoints" and path.name.startswith(PREFIX):
        run_dir, candidates = path.parent.parent, [path]
    else:
        run_dir, candidates = path, list_checkpoints(path)
    if not (run_dir / "config.yaml").is_file():
        raise CheckpointError(f"--resume: '{path}' is not a run directory or checkpoint (no config.yaml in {run_dir})")
    ckpt, notes = newest_good(run_dir, candidates)
    if ckpt is None:
        raise CheckpointError(f"--resume: no usable checkpoint in {run_dir}" + (f" ({'; '.join(notes)})" if notes else ""))
    return run_dir, ckpt, notes
