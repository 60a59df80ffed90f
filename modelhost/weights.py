"""A model's tensors without tied duplicates: the one rule of every weight transfer.

GPT-2's ``lm_head.weight`` is its input embedding (``transformer.wte.weight``): both names
are in its ``state_dict``, with one storage. Sending both would send the embedding twice;
the first name of each storage is kept, in ``state_dict`` order, on the sending and the
receiving side alike.
"""
from __future__ import annotations

import numpy as np
import torch


def _storage(tensor: torch.Tensor) -> tuple:
    """What makes two state_dict entries one tensor: the same memory, shape and dtype (an empty
    tensor is never a duplicate: empty tensors may all report the same address)."""
    return (tensor.data_ptr(), tuple(tensor.shape), tensor.dtype) if tensor.numel() else (id(tensor),)


def tied_aliases(module: torch.nn.Module) -> dict[str, str]:
    """{state_dict name: the earlier name whose tensor it is} for every tied duplicate
    (GPT-2: ``{"lm_head.weight": "transformer.wte.weight"}``)."""
    first: dict[tuple, str] = {}
    aliases = {}
    for name, tensor in module.state_dict().items():
        key = _storage(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
    return aliases


def distinct_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's live state_dict tensors (on their device, sharing storage), tied duplicates
    omitted, in state_dict order."""
    tied = tied_aliases(module)
    return {name: t.detach() for name, t in module.state_dict().items() if name not in tied}


def tied_duplicates(module: torch.nn.Module) -> set[str]:
    """state_dict names that alias an earlier entry's storage (GPT-2's ``lm_head.weight``)."""
    return set(tied_aliases(module))


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy of ``tensor``: what goes through Ray's object store (numpy arrays are
    read there without a copy). numpy has no bfloat16: such a tensor goes as its bits in int16,
    which ``from_numpy`` reads back."""
    tensor = tensor.detach().to("cpu", copy=True)
    return tensor.view(torch.int16).numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()


def from_numpy(value: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``to_numpy``'s array as a tensor without a copy, for a destination of ``dtype``."""
    tensor = torch.as_tensor(value)
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 and tensor.dtype == torch.int16 else tensor


def merge_lora(base: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """base + up @ down (a LoRA adapter's update of a weight), summed in float64 and rounded once
    to ``base``'s dtype: the same numbers wherever it is computed, so the learner and a rollout
    actor that merge one adapter into one base hold the same weights (their fingerprints agree)."""
    return (base.double() + up.to(base.device, torch.float64) @ down.to(base.device, torch.float64)).to(base.dtype)
