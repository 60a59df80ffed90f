"""Data-parallel ranks of the learner on its node (``cluster.learner_processes``).

Why processes and not threads: the PPO step's matrices are small (a minibatch is a few
thousand tokens), so torch's second thread often waits for the first, and both wait whenever
either core is busy with something else; processes of one thread each wait on each other only
when they sum gradients (BENCHMARKS.md measures both).

How: rank 0 lives in the learner actor (``learner.core.actor``); it starts ranks 1..W-1 as
child processes, each with its own replica of the policy, reference and Adam. Rank 0 sends
every state-changing call (the step, loading a checkpoint) to every rank, and all run it on
their own rows of each minibatch (``own_rows``): the per-token results of the no-grad passes
are summed into whole-batch tensors, each rank's loss is its share of the minibatch's masked
means (``ppo.ppo_loss``), and gradients are summed over ranks before Adam, so every replica
takes the step the reference takes on the whole minibatch (up to the order of float sums: the
golden cases pass with 2 ranks). Reads (weights, checkpoints, export) are rank 0's alone.

gloo on CPU only: a learner on a GPU runs as one process. A child that dies or stops
answering makes rank 0's next collective fail; rank 0 raises :class:`RankLost`, and in a run
the learner actor then exits, so the driver replaces it from the newest checkpoint like any
lost learner.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import logging
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]  # the project root, so a child finds the packages


class RankLost(RuntimeError):
    """A learner rank died or stopped answering; the learner cannot go on."""


class Ranks:
    """This process's place among the learner's ranks, and the collectives the step needs.

    ``Ranks.single()`` is the one-process learner: every collective is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None,
                 children: Sequence[subprocess.Popen] = (), exit_on_loss: bool = False) -> None:
        self.rank, self.world, self.group = rank, world, group
        self.children = list(children)
        self.exit_on_loss = exit_on_loss

    @classmethod
    def single(cls) -> "Ranks":
        return cls()

    @classmethod
    def start(cls, world: int, timeout_s: float, exit_on_loss: bool, module: str) -> "Ranks":
        """Rank 0: start ranks 1..world-1 as child processes (``python -m module``, which calls
        :meth:`join`) and form the group with them."""
        store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        children = [subprocess.Popen([sys.executable, "-m", module, "--rank", str(r),
                                      "--world", str(world), "--port", str(store.port),
                                      "--timeout-s", str(timeout_s), "--parent", str(os.getpid())], env=env)
                    for r in range(1, world)]
        ranks = cls(0, world, None, children, exit_on_loss)
        ranks.group = ranks._guard(lambda: _gloo(store, 0, world, timeout_s), "forming the learner's ranks")
        ranks.store = store  # rank 0 hosts the rendezvous: keep it alive with the group
        return ranks

    @classmethod
    def join(cls, argv: list[str] | None = None) -> "Ranks":
        """Ranks 1..W-1, in the child process :meth:`start` began: join rank 0's group."""
        parser = argparse.ArgumentParser(description="A learner rank started by rank 0 (not for direct use).")
        for name in ("--rank", "--world", "--port", "--parent"):
            parser.add_argument(name, type=int, required=True)
        parser.add_argument("--timeout-s", type=float, required=True)
        args = parser.parse_args(argv)
        _die_with_parent(args.parent)
        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank {args.rank} %(name)s: %(message)s")
        store = dist.TCPStore("127.0.0.1", args.port, args.world, is_master=False,
                              timeout=datetime.timedelta(seconds=args.timeout_s))
        return cls(args.rank, args.world, _gloo(store, args.rank, args.world, args.timeout_s))

    # ------------------------------------------------------------------ which rows

    def own_rows(self, n: int) -> tuple[int, int]:
        """[lo, hi): this rank's contiguous share of a batch of n rows (sizes differ by at most one)."""
        return n * self.rank // self.world, n * (self.rank + 1) // self.world

    # ------------------------------------------------------------------ collectives

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns the tensor."""
        if self.world > 1:
            self._guard(lambda: self.group.allreduce([tensor]).wait(), "summing over the learner's ranks")
        return tensor

    def total(self, tensor: torch.Tensor) -> torch.Tensor:
        """A new tensor: the sum over ranks of a (no-grad) tensor."""
        return self.sum_(tensor.detach().clone()) if self.world > 1 else tensor

    def from_rows(self, part: torch.Tensor, n: int) -> torch.Tensor:
        """The whole batch's (n, ...) tensor from every rank's own rows (others' rows are zeros
        before the sum, so the sum is exact)."""
        if self.world == 1:
            return part
        lo, hi = self.own_rows(n)
        whole = torch.zeros((n, *part.shape[1:]), dtype=part.dtype, device=part.device)
        whole[lo:hi] = part.detach()
        return self.sum_(whole)

    def sum_grads_(self, params: Sequence[torch.nn.Parameter]) -> None:
        """Every parameter's gradient summed over ranks (one flat buffer, one collective)."""
        if self.world == 1:
            return
        for p in params:  # a rank that has not run backward yet still sends zeros, so buffers match
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = self.sum_(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's values in every rank's ``tensor`` (same shape and dtype everywhere)."""
        if self.world > 1:
            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self._guard(lambda: self.group.broadcast([tensor], opts).wait(), "sending to the learner's ranks")
        return tensor

    def send(self, obj: Any) -> None:
        """Rank 0: a picklable object to every other rank (they call ``receive``)."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.broadcast_(torch.tensor([data.numel()], dtype=torch.long))
        self.broadcast_(data)

    def receive(self) -> Any:
        size = self.broadcast_(torch.zeros(1, dtype=torch.long))
        data = self.broadcast_(torch.empty(int(size), dtype=torch.uint8))
        return pickle.loads(data.numpy().tobytes())

    def close(self) -> None:
        """Rank 0: tell the children to stop, and make sure they do."""
        if self.rank != 0 or not self.children:
            return
        try:
            if all(c.poll() is None for c in self.children):
                self.send(None)
        except RankLost:
            pass
        for child in self.children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        self.children = []

    def _guard(self, op, what: str):
        try:
            return op()
        except RuntimeError as err:  # gloo: a peer closed its connection, or the timeout passed
            dead = [f"rank {r} (pid {c.pid}) exited with code {c.returncode}"
                    for r, c in enumerate(self.children, start=1) if c.poll() is not None]
            msg = f"{what} failed: {'; '.join(dead) or str(err).splitlines()[0]}"
            if self.exit_on_loss:
                # In a run: end the learner actor, so the driver replaces it from the newest
                # checkpoint as it does any lost learner (its ranks are of no use without this one).
                log.error("%s; the learner exits so the driver starts a new one", msg)
                for child in self.children:
                    child.kill()
                logging.shutdown()
                os._exit(70)
            raise RankLost(msg) from None


def _gloo(store: dist.Store, rank: int, world: int, timeout_s: float) -> Any:
    """A gloo group on the loopback interface: the ranks share a node, and nothing else
    should reach them (gloo's default device binds the address the host name resolves to)."""
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return dist.ProcessGroupGloo(store, rank, world, options)


def _die_with_parent(parent: int) -> None:
    """A child rank is killed when rank 0's process ends, however it ends (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # rank 0 died before the call above
        os._exit(1)
