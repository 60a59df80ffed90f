"""The learner's state as data only: safetensors and JSON, never a pickle.

Two files, which the run's checkpoints hold next to the driver's own:

- ``learner.safetensors``: the policy's and value head's weights (a tied weight once, its
  other names recorded as aliases: ``modelhost.weights``; with LoRA only the trained ones,
  adapters and value head, since the frozen base is the policy folder's), Adam's per-parameter tensors as
  ``optimizer/<index>/<name>``, and the torch RNG;
- ``learner.json``: what the caller adds (KL coefficient, numpy RNG, weight version), the
  aliases, Adam's settings and scalars.
"""
from __future__ import annotations

import json
from typing import Any

import torch

from modelhost.weights import distinct_tensors, tied_aliases

LEARNER_TENSORS, LEARNER_META = "learner.safetensors", "learner.json"


def pack_learner(model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                 torch_rng: torch.Tensor) -> dict[str, bytes]:
    """The learner's state as {LEARNER_TENSORS: safetensors bytes, LEARNER_META: JSON bytes}."""
    from safetensors.torch import save

    aliases = tied_aliases(model)
    frozen = _frozen(model)  # LoRA's base weights: the policy folder holds them, unchanged
    tensors = {f"model/{name}": t.cpu().contiguous() for name, t in distinct_tensors(model).items()
               if name not in frozen}
    opt = optimizer.state_dict()
    scalars = {}
    for index, state in opt["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}/{name}"] = value
    tensors["torch_rng"] = torch_rng
    meta = {**meta, "aliases": aliases, "frozen_omitted": bool(frozen), "optimizer_param_groups": opt["param_groups"], "optimizer_scalars": scalars}
    return {LEARNER_TENSORS: save(tensors), LEARNER_META: json.dumps(meta).encode()}


def _frozen(model: torch.nn.Module) -> set[str]:
    """Names of the parameters nothing trains (LoRA's base weights)."""
    return {name for name, p in model.named_parameters() if not p.requires_grad}


def unpack_learner(files: dict[str, bytes], model: torch.nn.Module, optimizer: torch.optim.Optimizer
                   ) -> tuple[dict[str, Any], torch.Tensor]:
    """Loads ``pack_learner``'s files into model and optimizer; returns (meta, torch RNG state)."""
    from safetensors.torch import load

    tensors = load(files[LEARNER_TENSORS])
    meta = json.loads(files[LEARNER_META])
    weights = {name[len("model/"):]: t for name, t in tensors.items() if name.startswith("model/")}
    weights.update({alias: weights[target] for alias, target in meta["aliases"].items() if target in weights})
    if meta.get("frozen_omitted"):
        result = model.load_state_dict(weights, strict=False)
        frozen = _frozen(model) | {a for a, target in meta["aliases"].items() if target not in weights}
        if result.unexpected_keys or set(result.missing_keys) - frozen:
            raise ValueError(f"the checkpoint does not fit this learner: unexpected {result.unexpected_keys[:3]}, "
                             f"missing {sorted(set(result.missing_keys) - frozen)[:3]}")
    else:
        model.load_state_dict(weights)
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = t
    for name, value in meta["optimizer_scalars"].items():
        index, key = name.split("/", 1)
        state.setdefault(int(index), {})[key] = value
    # Adam's moments come back; its settings (the learning rate) are this run's, not the saved ones.
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    return meta, tensors["torch_rng"]
