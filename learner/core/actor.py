"""The learner actor's body: a ``PPOLearner`` with what a run needs around it.

The driver makes it an actor with ``ray.remote(LearnerActor)`` (so a cluster can place it on a
GPU node) and talks to it alone. Besides the step it serves the learner's ranks (a CPU learner
may run as several data-parallel processes, ``learner.core.ranks``), the weights and their
fingerprint for the rollout actors, the checkpoint files and the exported policy.

Child ranks run this module (``python -m learner.core.actor``): each builds the same learner
as rank 0 and runs what rank 0 sends until told to stop.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actors.fingerprint import fingerprint
from learner.config import PPOConfig
from learner.core.forward import PaddedBatch, RowOrder, TokenOutputs
from learner.core.learner import NonFiniteError, PPOLearner
from learner.core.models import save_policy
from learner.core.ranks import Ranks
from learner.core.state import pack_learner, unpack_learner
from modelhost.process import process_info, resolve_device
from modelhost.weights import distinct_tensors, numpy_copies

log = logging.getLogger(__name__)


class LearnerActor:
    """Rank 0 of the learner: the step on every rank; weights, checkpoints and export from here."""

    def __init__(self, policy: str, ppo_cfg: PPOConfig, seed: int = 0, device: str = "auto",
                 torch_threads: int = 0, row_order: RowOrder | None = None, processes: int = 1,
                 rank_timeout_s: float = 600.0, exit_on_rank_loss: bool = False, ranks: Ranks | None = None) -> None:
        """``processes`` > 1 starts that many data-parallel ranks on this node, each with
        ``torch_threads / processes`` threads; ``ranks`` is given to the ranks it starts."""
        resolved = resolve_device(device)
        if processes > 1 and resolved.type != "cpu":
            # The placement gave this learner a GPU (cluster.learner_gpus=-1 fits the cluster): one process.
            log.warning("cluster.learner_processes=%d is for a CPU learner; this one runs on %s, as one process",
                        processes, resolved)
            processes = 1
        if processes > 1:
            torch_threads = max(1, (torch_threads or os.cpu_count() or 1) // processes)
            ranks = Ranks.start(processes, rank_timeout_s, exit_on_rank_loss, module=__name__)
            ranks.send({"policy": policy, "ppo_cfg": ppo_cfg, "seed": seed, "device": "cpu",
                        "torch_threads": torch_threads})
        if torch_threads > 0:
            torch.set_num_threads(torch_threads)
        self.ranks = ranks or Ranks.single()
        self.learner = PPOLearner(policy, ppo_cfg, seed, resolved, row_order, self.ranks)

    @property
    def version(self) -> int:
        return self.learner.version

    @property
    def pad_id(self) -> int:
        return self.learner.pad_id

    # ------------------------------------------------------------------ on every rank

    def step(self, queries: list[list[int]], responses: list[list[int]], scores: list[float],
             behaviour_logprobs: list[list[float]] | None = None) -> dict[str, float]:
        """``PPOLearner.step`` on every rank; rank 0's statistics."""
        self._tell_ranks("_step", queries, responses, scores, behaviour_logprobs)
        return self._step(queries, responses, scores, behaviour_logprobs)

    def _step(self, *args: Any) -> dict[str, float]:
        return self.learner.step(*args)

    def load_state_bytes(self, files: dict[str, bytes]) -> int:
        """Restores ``state_bytes``' files on every rank; nothing in them is unpickled. Returns the version."""
        self._tell_ranks("_load_state_bytes", files)
        return self._load_state_bytes(files)

    def _load_state_bytes(self, files: dict[str, bytes]) -> int:
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

    def weights_agree(self) -> bool:
        """Whether every rank holds exactly rank 0's weights (for tests and debugging)."""
        self._tell_ranks("_weights_agree")
        return self._weights_agree()

    def _weights_agree(self) -> bool:
        mine = torch.nn.utils.parameters_to_vector(self.learner.model.parameters()).detach()
        differ = float(not torch.equal(mine, self.ranks.broadcast_(mine.clone())))
        return self.ranks.sum_(torch.tensor([differ])).item() == 0

    def _tell_ranks(self, method: str, *args: Any) -> None:
        """Rank 0: every other rank runs ``method(*args)`` too (they wait in ``serve``)."""
        if self.ranks.rank == 0 and self.ranks.world > 1:
            self.ranks.send((method, args))

    def serve(self) -> None:
        """Ranks 1..: run what rank 0 sends until it says stop. Errors every rank meets alike
        (a bad batch, a non-finite value) reach the driver from rank 0; this rank goes on."""
        while (command := self.ranks.receive()) is not None:
            method, args = command
            try:
                getattr(self, method)(*args)
            except (ValueError, NonFiniteError) as err:
                log.debug("rank %d: %s failed: %s", self.ranks.rank, method, err)

    def close(self) -> None:
        """Stops the learner's other ranks (a one-process learner has nothing to stop)."""
        self.ranks.close()

    # ------------------------------------------------------------------ rank 0 alone

    def policy_outputs(self, batch: PaddedBatch) -> TokenOutputs:
        return self.learner.policy_outputs(batch)

    def weights(self) -> tuple[int, dict[str, np.ndarray]]:
        """(version, weights): call with ``num_returns=2`` so the weights stay in the object store."""
        return self.learner.version, self.get_weights()

    def get_weights(self) -> dict[str, np.ndarray]:
        """The causal LM's weights as numpy (zero-copy in Ray's object store), tied copies once."""
        return numpy_copies(self.learner.model.pretrained_model)

    def weights_fingerprint(self) -> tuple[int, list[float]]:
        """(version, actors.fingerprint of the LM weights): what every rollout actor must report."""
        return self.learner.version, fingerprint(distinct_tensors(self.learner.model.pretrained_model).values())

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
        """pid, node, device and weight version, for the driver's start-up log and health checks."""
        ranks = {"rank_pids": [c.pid for c in self.ranks.children]} if self.ranks.children else {}
        return {**process_info(self.learner.device), "version": self.learner.version, **ranks}


def serve_rank() -> None:
    """Ranks 1..W-1: join the group, build the same learner as rank 0, then run what it sends."""
    ranks = Ranks.join()
    LearnerActor(**ranks.receive(), ranks=ranks).serve()


if __name__ == "__main__":
    serve_rank()
