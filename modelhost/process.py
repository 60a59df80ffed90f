"""The device a process computes on, and where it runs."""
from __future__ import annotations

import os
import uuid

import torch

INSTANCE = uuid.uuid4().hex
"""This process's own id: a restarted actor is a new process with a new id, even where its pid
is reused (a container, another node)."""


def resolve_device(name: str) -> torch.device:
    """``"auto"``: cuda when torch sees a GPU in this process, else cpu. An explicit cuda
    device where torch sees none is a one-line error, not a failure at the first tensor.

    A Ray actor that asked for no GPU sees none (Ray empties CUDA_VISIBLE_DEVICES), so
    ``"auto"`` puts it on the CPU even on a GPU node.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but torch sees no CUDA device in this process; "
                         "use 'auto' or 'cpu'")
    return device


def process_info(device: torch.device | str) -> dict:
    """pid, this process's id, Ray node id (None outside Ray) and device: what each actor's
    ``ping`` reports, for the driver's restart checks and the run directory's ``actors.json``."""
    import ray  # here, not at the top: the plain classes also run without Ray

    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"pid": os.getpid(), "instance": INSTANCE, "node_id": node_id, "device": str(device)}
