"""A model's tensors without tied duplicates: the one rule of every weight transfer.

GPT-2's ``lm_head.weight`` is its input embedding (``transformer.wte.weight``): both names
are in its ``state_dict``, with one storage. Sending both would send the embedding twice;
the first name of each storage is kept, in ``state_dict`` order, on the sending and the
receiving side alike.
"""
from __future__ import annotations

import numpy as np
import torch


def distinct_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's live state_dict tensors (on their device, sharing storage), tied duplicates
    omitted, in state_dict order."""
    seen: set[int] = set()
    out = {}
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach()
    return out


def tied_duplicates(module: torch.nn.Module) -> set[str]:
    """state_dict names that alias an earlier entry's storage (GPT-2's ``lm_head.weight``)."""
    return set(module.state_dict()) - set(distinct_tensors(module))


def numpy_copies(module: torch.nn.Module) -> dict[str, np.ndarray]:
    """The distinct tensors as numpy copies on the CPU: what goes through Ray's object store
    (numpy arrays are read there without a copy)."""
    return {name: tensor.to("cpu", copy=True).numpy() for name, tensor in distinct_tensors(module).items()}
