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
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from learner.config import looks_local

log = logging.getLogger(__name__)

VALUE_HEAD_FILE = "value_head.safetensors"


class ModelLoadError(ValueError):
    """A model that cannot be loaded; the message says what to pass instead."""


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
    """A causal LM and a value head on its last hidden state."""

    def __init__(self, pretrained_model: nn.Module, value_head: ValueHead) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = value_head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns fp32 logits (B, L, V) and values (B, L)."""
        out = self.pretrained_model(input_ids=input_ids, attention_mask=attention_mask,
                                    position_ids=position_ids, output_hidden_states=True, use_cache=False)
        return out.logits.float(), self.v_head(out.hidden_states[-1])


def load_pretrained(cls, name_or_path: str, what: str, **kwargs):
    """``cls.from_pretrained`` that tries a local folder first and fails in one line.

    A hub look-up without network retries for ~50 s and then raises a long error; a
    user who meant a local folder wants to hear that instead.
    """
    path = Path(name_or_path).expanduser()
    if looks_local(name_or_path) and not path.is_dir():
        raise ModelLoadError(f"{what} '{name_or_path}' does not exist: pass an existing save_pretrained folder")
    try:
        return cls.from_pretrained(str(path) if path.is_dir() else name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"{what} '{name_or_path}' could not be loaded ({first[:200]}): "
                             "pass a local save_pretrained folder") from err


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The policy's tokenizer with pad = EOS, as in the recipe."""
    tok = load_pretrained(AutoTokenizer, name_or_path, "policy tokenizer")
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


def load_policy(name_or_path: str, seed: int, device: str = "cpu") -> tuple[PolicyWithValueHead, nn.Module]:
    """(policy with value head, frozen reference copy), both in eval mode (dropout off)."""
    lm = load_pretrained(AutoModelForCausalLM, name_or_path, "policy model", dtype=torch.float32)
    policy = PolicyWithValueHead(lm, load_value_head(name_or_path, lm.config.hidden_size, seed))
    policy.to(device).eval()
    ref = copy.deepcopy(lm).to(device).eval()
    ref.requires_grad_(False)
    return policy, ref


def save_policy(policy: PolicyWithValueHead, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> Path:
    """A folder ``transformers.pipeline("text-generation", model=folder)`` loads, plus the value head."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.pretrained_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    head = {f"summary.{k}": v.detach().cpu().contiguous() for k, v in policy.v_head.summary.state_dict().items()}
    save_file(head, str(folder / VALUE_HEAD_FILE))
    return folder


def lm_weights(policy: PolicyWithValueHead) -> dict[str, torch.Tensor]:
    """The causal LM's weights for the rollout actors: state_dict without tied duplicates, on CPU."""
    seen: set[int] = set()
    out = {}
    for name, tensor in policy.pretrained_model.state_dict().items():
        if tensor.data_ptr() in seen:  # GPT-2's lm_head.weight is the input embedding
            continue
        seen.add(tensor.data_ptr())
        out[name] = tensor.detach().to("cpu", copy=True)
    return out
