"""The learner's data-parallel group as the PPO step sees it.

Every rank runs every step on its own contiguous slice of each minibatch's rows (``share``);
the no-grad passes and the statistics need the whole batch's rows, which ``gather`` collects
from every rank, and every rank must walk the rows in rank 0's order (``same_on_every_rank``).
With one rank each of these is the identity, so the step reads the same with and without DDP.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from learner.core.forward import share


@dataclass(frozen=True)
class RankGroup:
    """This process's rank among ``world`` learner ranks (0 of 1 without a process group)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def joined(cls) -> "RankGroup":
        """The default process group, which the caller has initialised."""
        return cls(dist.get_rank(), dist.get_world_size())

    def own(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the rows ``idx``."""
        return share(idx, self.rank, self.world)

    def gather(self, part: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The rows of every rank's slice of ``idx`` (this rank's are ``part``), in ``idx`` order."""
        if self.world == 1:
            return part
        sizes = [len(share(idx, r, self.world)) for r in range(self.world)]
        padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=part.dtype, device=part.device)
        padded[:len(part)] = part.detach()
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        return torch.cat([p[:k] for p, k in zip(parts, sizes)])

    def same_on_every_rank(self, t: torch.Tensor, device: torch.device) -> torch.Tensor:
        """Rank 0's ``t`` (each rank draws the same from the same seed and checkpoint; this
        makes sure). ``device`` is where the collective runs: NCCL moves GPU tensors only."""
        if self.world == 1:
            return t
        on_device = t.to(device)
        dist.broadcast(on_device, src=0)
        return on_device.cpu()


def data_parallel(module: nn.Module) -> nn.Module:
    """``module`` in ``DistributedDataParallel``, which starts every rank from rank 0's weights.
    The policy's buffers are constants: no sync before every forward (the keyword's name since
    torch 2.13, and before it)."""
    ddp = nn.parallel.DistributedDataParallel
    sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
            else {"broadcast_buffers": False})
    return ddp(module, **sync)
