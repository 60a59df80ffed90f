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
