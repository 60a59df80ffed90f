"""Hugging Face models and tokenizers from a local folder or the hub: quietly, with one-line errors.

Every model of the project loads through :func:`load_pretrained`: the learner's policy and
tokenizer, the rollout actors' policy, the reward actors' classifier, the driver's config
checks and the report.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelhost.errors import one_line

if TYPE_CHECKING:  # torch and transformers load with the first model: the settings code needs neither
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to pass instead."""


def looks_local(value: str) -> bool:
    """Whether a model or dataset name is a path the user meant rather than a hub id.

    Hub ids are 'name' or 'org/name'; anything else (or anything that exists here) is a path.
    """
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or os.path.exists(value)


def quiet_progress_bars() -> None:
    """Turns off transformers' (and the hub's) progress bars in this process: "Loading weights"
    at every load, "Writing model shards" at every save. An actor's console is the driver's,
    and the driver prints its own lines."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def load_pretrained(cls: Any, name_or_path: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` from a local folder, or else the hub, failing in one line.

    A name that looks like a path (:func:`looks_local`) must be an existing folder: a hub
    look-up of it without network retries for ~50 s and then raises a long error, and the
    user meant the folder. ``what`` names the setting in the message ("reward model").
    """
    quiet_progress_bars()
    path = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not path.is_dir():
        raise ModelLoadError(f"{what} '{name_or_path}' does not exist: pass an existing save_pretrained folder")
    try:
        return cls.from_pretrained(str(path) if path.is_dir() else name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        where = "could not be loaded from its folder" if path.is_dir() else \
            "is not a local folder and could not be loaded from the hub"
        raise ModelLoadError(f"{what} '{name_or_path}' {where} ({one_line(err, 200)}): "
                             "pass a local save_pretrained folder") from err


def load_model_and_tokenizer(cls: Any, name_or_path: str, what: str
                             ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model in fp32 (the reference's dtype, whatever the checkpoint was saved in) and its tokenizer."""
    import torch
    from transformers import AutoTokenizer

    model = load_pretrained(cls, name_or_path, what, dtype=torch.float32)
    return model, load_pretrained(AutoTokenizer, name_or_path, f"{what}'s tokenizer")


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_weights(name_or_path: str, what: str) -> None:
    """A local model folder holds weights that can be loaded: a weight file exists, a sharded
    index names files that exist, and every safetensors file's header parses and fits the file.
    Cheap (headers only), so a broken folder fails before any process starts. A hub id is left
    to the hub."""
    import json

    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        return
    found = [folder / f for f in WEIGHT_FILES if (folder / f).is_file()]
    if not found:
        raise ModelLoadError(f"{what} '{name_or_path}' has no weights ({' or '.join(WEIGHT_FILES[::2])}): "
                             "pass a complete save_pretrained folder")
    files = set(found)
    for index in (f for f in found if f.name.endswith(".index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelLoadError(f"{what} '{name_or_path}': {index.name} is not a valid weight index") from None
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            raise ModelLoadError(f"{what} '{name_or_path}': {index.name} names {missing[0]}, which is missing")
        files |= {folder / s for s in shards}
    for file in sorted(f for f in files if f.suffix == ".safetensors"):
        problem = safetensors_problem(file)
        if problem:
            raise ModelLoadError(f"{what} '{name_or_path}': {file.name} is not a valid safetensors file ({problem}); "
                                 "save the model again")


def safetensors_problem(file: Path) -> str | None:
    """Why a safetensors file cannot be loaded, from its header alone (None if it can)."""
    import json
    import struct

    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "shorter than its header"
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            return "its header's length exceeds the file"
        try:
            header = json.loads(f.read(n))
            ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError):
            return "its header is not valid"
    if max(ends, default=0) > size - 8 - n:
        return "its tensors extend past the end of the file: it is truncated"
    return None
