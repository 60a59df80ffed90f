"""The policy with its value head, the frozen reference, and loading/saving them.

The value head matches TRL's ``AutoModelForCausalLMWithValueHead``: dropout(0.1) then
``Linear(hidden, 1)`` on the LAST entry of the model's ``hidden_states`` (for GPT-2 that
is after the final layer norm), sharing the policy's trunk. Parameter names
(``pretrained_model.*``, ``v_head.summary.*``) match the reference checkpoints, so the
golden cases compare name for name.
"""
from __future__ import annotations

import copy
import logging
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

# ModelLoadError and load_pretrained live in the leaf every actor imports; the driver takes them from here.
from modelhost.loading import ModelLoadError, load_pretrained, quiet_progress_bars

__all__ = ["ModelLoadError", "PolicyWithValueHead", "VALUE_HEAD_FILE", "ValueHead", "enable_gradient_checkpointing",
           "load_policy",
           "load_pretrained", "load_tokenizer", "load_value_head", "save_policy"]

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """dropout -> Linear(hidden, 1), one value per position."""

    def __init__(self, hidden_size: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.summary = nn.Linear(hidden_size, 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T)
        hidden = hidden.to(self.summary.weight.dtype)
        return self.summary(self.dropout(hidden)).squeeze(-1)


class PolicyWithValueHead(nn.Module):
    """A causal LM and a value head on its last hidden state: one module, so one
    ``state_dict`` and one optimizer hold both. The learner runs the two parts itself
    (``PPOLearner`` applies the LM head at response positions only)."""

    def __init__(self, pretrained_model: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = value_head


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The policy's tokenizer with pad = EOS, as in the recipe."""
    tok = load_pretrained(AutoTokenizer, name_or_path, "policy tokenizer")
    if tok.eos_token is None:  # EOS ends responses and pads batches
        raise ModelLoadError(f"policy tokenizer '{name_or_path}' has no EOS token: set eos_token in its "
                             "tokenizer_config.json")
    tok.pad_token = tok.eos_token
    return tok


def load_value_head(name_or_path: str, hidden_size: int, seed: int) -> ValueHead:
    """The saved value head beside the model, or a fresh one initialised from ``seed``."""
    head = ValueHead(hidden_size)
    file = Path(name_or_path) / VALUE_HEAD_FILE
    if file.is_file():
        state = load_file(str(file))
        head.summary.load_state_dict({"weight": state["summary.weight"], "bias": state["summary.bias"]})
        log.info("value head loaded from %s", file)
    else:
        # Fresh head: a seeded generator so two runs with one seed start identically
        # whatever else consumed the global RNG before.
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / hidden_size**0.5  # nn.Linear's default init range
        with torch.no_grad():
            head.summary.weight.uniform_(-bound, bound, generator=gen)
            head.summary.bias.uniform_(-bound, bound, generator=gen)
        log.info("no %s in %s: value head freshly initialised (seed %d)", VALUE_HEAD_FILE, name_or_path, seed)
    return head


def load_policy(name_or_path: str, seed: int, device: str = "cpu", reference: bool = True
                ) -> tuple[PolicyWithValueHead, nn.Module | None]:
    """(policy with value head, frozen reference copy or None when not ``reference``), both in
    eval mode (dropout off)."""
    lm = load_pretrained(AutoModelForCausalLM, name_or_path, "policy model", dtype=torch.float32)
    policy = PolicyWithValueHead(lm, load_value_head(name_or_path, lm.config.hidden_size, seed))
    policy.to(device).eval()
    if not reference:
        return policy, None
    ref = copy.deepcopy(lm).to(device).eval()
    ref.requires_grad_(False)
    return policy, ref


def add_lora(lm: nn.Module, rank: int, alpha: float, target_modules: str) -> nn.Module:
    """LoRA adapters (PEFT) injected into ``lm`` in place; every other weight of ``lm`` frozen.
    Returns the PEFT model around ``lm``, whose ``disable_adapter()`` gives the base model back
    (the reference). ``target_modules``: comma-separated names, empty for PEFT's default."""
    from peft import LoraConfig, get_peft_model
    from transformers.pytorch_utils import Conv1D

    targets = [t.strip() for t in target_modules.split(",") if t.strip()] or None
    conv1d = any(isinstance(m, Conv1D) for m in lm.modules())  # GPT-2 stores weights as (in, out)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets, fan_in_fan_out=conv1d)
    try:
        with warnings.catch_warnings():  # PEFT calls transformers' deprecated spellings; not ours to act on
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(lm, config)
    except ValueError as err:  # PEFT: no such target module in the model
        raise ModelLoadError(f"ppo.lora_target_modules: {str(err).splitlines()[0]}") from None


def lora_factors(lm: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name of the adapted weight in the plain model's state_dict: (up, down)} with
    weight = base + up @ down (LoRA's B @ A * scale, transposed for GPT-2's (in, out) Conv1D)."""
    from peft.tuners.lora import LoraLayer

    factors = {}
    for path, module in lm.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight  # (r, in), (out, r)
            b = b * module.scaling["default"]
            name = f"{path}.weight"
            factors[name] = (a.T, b.T) if module.fan_in_fan_out else (b, a)
    return factors


def plain_names(lm: nn.Module) -> dict[str, str]:
    """{state_dict name of ``lm``: its name in the model without adapters}, adapters' own omitted."""
    return {name: name.replace(".base_layer.", ".") for name in lm.state_dict() if "lora_" not in name}


def enable_gradient_checkpointing(lm: nn.Module) -> None:
    """transformers' gradient checkpointing (non-reentrant) for ``lm``'s layers: their
    activations are recomputed in backward instead of kept. transformers checkpoints a layer
    only in training mode, and the learner runs in eval mode (dropout off, as the reference's
    forward passes): the checkpointed layers alone are marked as training, their dropouts stay off."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    enable = getattr(lm, "activation_checkpointing_enable", None)  # its name from transformers 5.x on
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in lm.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True  # this module only: its children keep eval mode


def _merged_copy(lm: nn.Module) -> nn.Module:
    """A copy of ``lm`` with every LoRA adapter merged into its weight and the adapter layers
    replaced by their base layers: the plain model (PEFT's merge_and_unload, on a copy)."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(lm)
    for path, module in list(merged.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = path.rpartition(".")
            setattr(merged.get_submodule(parent), child, module.get_base_layer())
    return merged


def save_policy(policy: PolicyWithValueHead, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """A folder ``transformers.pipeline("text-generation", model=folder)`` loads, plus the value head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    quiet_progress_bars()  # "Writing model shards" would print in the learner actor's console
    lm = policy.pretrained_model
    if any("lora_" in name for name in lm.state_dict()):  # LoRA: a merged copy, so any pipeline loads it
        lm = _merged_copy(lm)
    lm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head = {f"summary.{k}": v.detach().cpu().contiguous() for k, v in policy.v_head.summary.state_dict().items()}
    save_file(head, str(folder / VALUE_HEAD_FILE))
    return folder

