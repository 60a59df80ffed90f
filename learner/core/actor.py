"""The learner actor's body: a ``PPOLearner`` with what a run needs around it.

The driver makes it an actor with ``ray.remote(LearnerActor)`` (so a cluster can place it on a
GPU node). A learner of several data-parallel ranks (``cluster.learner_processes``) is that
many actors, one per bundle of the run's placement group: the driver asks rank 0 where the
group meets (``rendezvous``), every rank joins it (``join``: gloo on CPU, NCCL on GPU) and
wraps its policy in ``DistributedDataParallel`` (``PPOLearner.join_group``). The driver then
calls ``step`` and ``load_state_bytes`` on every rank, and everything else (weights and their
fingerprint for the rollout actors, the checkpoint files, the exported policy) on rank 0 alone.
"""
from __future__ import annotations

import datetime
import logging
import socket
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from actors.fingerprint import fingerprint
from actors.rollout import DTYPES
from learner.config import PPOConfig
from learner.core.forward import PaddedBatch, RowOrder, TokenOutputs
from learner.core.learner import PPOLearner
from learner.core.models import lora_factors, plain_names, save_policy
from learner.core.state import pack_learner, unpack_learner
from modelhost.process import process_info, resolve_device
from modelhost.weights import distinct_tensors, merge_lora, to_numpy

log = logging.getLogger(__name__)


class LearnerActor:
    """One rank of the learner: the step on every rank; weights, checkpoints and export from rank 0."""

    def __init__(self, policy: str, ppo_cfg: PPOConfig, seed: int = 0, device: str = "auto",
                 torch_threads: int = 0, row_order: RowOrder | None = None, rank: int = 0, world: int = 1,
                 rollout_dtype: str = "float32") -> None:
        """``rank`` of ``world`` ranks; with world > 1 the learner steps only after ``join``.
        ``rollout_dtype``: the dtype rollout actors hold the policy in (rollout.dtype); the
        weights are handed over in it, the learner's own stay fp32."""
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.rank, self.world, self.rollout_dtype = rank, world, DTYPES[rollout_dtype]
        self.learner = PPOLearner(policy, ppo_cfg, seed, resolve_device(device), row_order)

    @property
    def version(self) -> int:
        return self.learner.version

    @property
    def pad_id(self) -> int:
        return self.learner.pad_id

    # ------------------------------------------------------------------ the ranks' group

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0: (its node's address, a free port there), where every rank joins the group."""
        import ray  # here: the plain class also runs without Ray

        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        with socket.socket() as sock:
            sock.bind(("", 0))
            return host, sock.getsockname()[1]

    def join(self, address: tuple[str, int], timeout_s: float) -> None:
        """Joins the ranks' process group (every rank calls this at once) and wraps the policy
        in DDP, which starts every rank from rank 0's weights. A collective that waits longer
        than ``timeout_s`` on a rank fails."""
        host, port = address
        backend = "nccl" if self.learner.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                world_size=self.world, timeout=datetime.timedelta(seconds=timeout_s))
        self.learner.join_group()

    def close(self) -> None:
        """Leaves the process group (nothing to do for a one-rank learner)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ on every rank

    def step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
             behaviour_logprobs: list[list[float]] | None = None) -> dict[str, float]:
        """``PPOLearner.step``; every rank must run it with the same batch."""
        return self.learner.step(queries, responses, scores, behaviour_logprobs)

    def load_state_bytes(self, files: dict[str, bytes]) -> int:
        """Restores ``state_bytes``' files (every rank must); nothing in them is unpickled. Returns the version."""
        learner = self.learner
        meta, torch_rng = unpack_learner(files, learner.model, learner.optimizer)
        # Adam's state carries the saved run's learning rate; this run's setting wins, so
        # --ppo.learning_rate on --resume takes effect (the moments are kept).
        for group in learner.optimizer.param_groups:
            group["lr"] = learner.cfg.learning_rate
        learner.kl_ctl.value = meta["kl_coef"]
        learner.rng.bit_generator.state = meta["numpy_rng"]
        torch.set_rng_state(torch_rng)
        learner.version = meta["version"]
        return learner.version

    # ------------------------------------------------------------------ rank 0 alone

    def policy_outputs(self, batch: PaddedBatch) -> TokenOutputs:
        return self.learner.policy_outputs(batch)

    def weights(self) -> tuple[int, dict[str, np.ndarray]]:
        """(version, weights): call with ``num_returns=2`` so the weights stay in the object store."""
        return self.learner.version, self.get_weights()

    def get_weights(self) -> dict[str, np.ndarray]:
        """What a rollout actor needs to hold the policy, as numpy (zero-copy in Ray's object store):
        the causal LM's weights, tied copies once; with LoRA only the adapters, as
        ``lora_up/<weight name>`` and ``lora_down/<weight name>`` with weight = base + up @ down."""
        lm = self.learner.model.pretrained_model
        if self.learner.peft is None:
            return {name: to_numpy(t.to(self.rollout_dtype)) for name, t in distinct_tensors(lm).items()}
        return {f"lora_{part}/{name}": to_numpy(t)
                for name, (up, down) in lora_factors(lm).items() for part, t in (("up", up), ("down", down))}

    def weights_fingerprint(self) -> tuple[int, list[float]]:
        """(version, actors.fingerprint of the weights a rollout actor holds once it has loaded
        ``get_weights``): what every rollout actor must report."""
        return self.learner.version, fingerprint(self.rollout_weights().values())

    def rollout_weights(self) -> dict[str, torch.Tensor]:
        """The causal LM's weights as a rollout actor holds them (names of the plain model, tied
        copies once, in rollout.dtype); with LoRA each adapted weight merged into the base as the
        rollout actor merges it."""
        lm, dtype = self.learner.model.pretrained_model, self.rollout_dtype
        if self.learner.peft is None:
            return {name: t.to(dtype) for name, t in distinct_tensors(lm).items()}
        names, factors = plain_names(lm), lora_factors(lm)
        plain = {names[n]: t.to(dtype) for n, t in distinct_tensors(lm).items() if n in names}
        return {n: merge_lora(t, *factors[n]) if n in factors else t for n, t in plain.items()}

    def state_bytes(self) -> dict[str, bytes]:
        """Everything needed to continue exactly (weights, Adam, KL coefficient, RNGs, version) as
        data only: {file name: bytes} in safetensors and JSON (``learner.core.state``)."""
        learner = self.learner
        meta = {"kl_coef": float(learner.kl_ctl.value), "numpy_rng": learner.rng.bit_generator.state,
                "version": learner.version}
        return pack_learner(learner.model, learner.optimizer, meta, torch.get_rng_state())

    def export_policy(self) -> dict[str, bytes]:
        """The tuned policy folder as {file name: bytes}, so the driver writes it wherever
        the run directory is (the learner may sit on another node)."""
        with tempfile.TemporaryDirectory() as tmp:
            save_policy(self.learner.model, self.learner.tokenizer, tmp)
            return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}

    def ping(self) -> dict:
        """pid, node, device, rank and weight version, for the driver's start-up log and health checks."""
        return {**process_info(self.learner.device), "version": self.learner.version, "rank": self.rank}
