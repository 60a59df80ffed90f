"""A cheap fingerprint of a model's weights, computed where the weights live.

Each step every rollout actor reports the fingerprint of the weights it holds and the driver
compares it with the learner's: a worker that silently kept old or damaged weights stops the
run with its name instead of training on wrong samples. Both sides list the causal LM's
``state_dict`` tensors in order without tied duplicates (``modelhost.weights.distinct_tensors``).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

SLICE = 8
"""Elements per slice: the first, middle and last SLICE elements and SLICE spread evenly."""


def _positions(n: int, device: torch.device) -> torch.Tensor:
    k = min(SLICE, n)
    mid = max(0, n // 2 - k // 2)
    idx = [range(k), range(mid, mid + k), range(n - k, n)]
    spread = [(n - 1) * j // max(1, k - 1) for j in range(k)]  # integer arithmetic: exact for any n
    return torch.tensor([i for r in idx for i in r] + spread, dtype=torch.long, device=device)


def fingerprint(tensors: Iterable[torch.Tensor]) -> list[float]:
    """One float64 sum of fixed slices per tensor, in the order given.

    Float32 values summed in float64 over 32 elements are (in practice) exact, so the same
    weights give the same numbers on any device and in any summation order. An update that
    changed a tensor anywhere but outside the slices goes unseen; a missed or damaged
    broadcast changes every slice it touches.
    """
    sums = []
    with torch.no_grad():
        for tensor in tensors:
            flat = tensor.detach().reshape(-1)
            if flat.numel() == 0:
                sums.append(torch.zeros((), dtype=torch.float64, device=flat.device))
                continue
            sums.append(flat[_positions(flat.numel(), flat.device)].double().sum())
    return [float(x) for x in torch.stack(sums).cpu()] if sums else []  # one device sync


def same(a: Sequence[float], b: Sequence[float], rel: float = 1e-9) -> bool:
    """Whether two fingerprints are of the same weights."""
    return len(a) == len(b) and all(math.isclose(x, y, rel_tol=rel, abs_tol=1e-12) for x, y in zip(a, b))
