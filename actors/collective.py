"""Collective weight broadcast: the learner sends its policy weights to every rollout actor
over ``torch.distributed`` (NCCL between GPUs, gloo on CPU), beside the object-store path.

One code path for both backends; only the backend string and the device of the buffers
differ (``cuda`` for NCCL, ``cpu`` for gloo). Ranks: the learner is rank 0 (the sender),
rollout actor i is rank i + 1.

What one broadcast moves, in order (every rank takes part in both collectives):

1. a fixed-size int64 header from rank 0: the weight version, the number of tensors, their
   total numel, a fingerprint of their shapes and dtypes, and per dtype group
   (dtype code, numel); receivers compare it with their own tensors;
2. one contiguous flat buffer per dtype (the layout of ``_flatten_dense_tensors``; the buffer
   is kept for the next broadcast unless ``keep_buffers=False``), ``dist.broadcast`` from
   rank 0; receivers then copy the slices back into their tensors in place.

If a receiver's layout differs from the sender's, it still receives the buffers (into
scratch buffers of the sender's sizes, so the sender and the other ranks never hang), leaves
its own weights untouched and raises :class:`WeightLayoutError`. The group stays usable.

Both sides must list the same tensors in the same order: the causal LM's ``state_dict``
order without tied duplicates (``lm_tensors`` on both sides), from the same model class.

**One group per process, on the default process group.** ``WeightGroup`` calls
``dist.init_process_group`` / ``dist.destroy_process_group``; a process can be in one
``WeightGroup`` at a time, and it must not use ``torch.distributed`` for anything else
meanwhile. To rebuild (say after Ray restarted a rollout actor), every surviving member
calls :meth:`WeightGroup.destroy` and then all members, the restarted one included, join a
new group on a NEW port (:func:`local_init_method` on the sender's node).

Driver-side sequence (rank 0's address must be taken on rank 0's node)::

    addr = ray.get(learner.weight_group_address.remote())     # calls local_init_method()
    n = len(rollouts) + 1
    ray.get([learner.join_weight_group.remote(addr, 0, n, backend, timeout_s)] +
            [w.join_weight_group.remote(addr, i + 1, n, backend, timeout_s)
             for i, w in enumerate(rollouts)])                # all at once: rendezvous blocks
    # each step (again all at once):
    ray.get([learner.send_weights.remote()] + [w.receive_weights.remote() for w in rollouts])
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import socket
import time
import urllib.parse
from typing import Iterable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from modelhost.errors import error_lines, first_line
from modelhost.weights import distinct_tensors

logger = logging.getLogger(__name__)

BACKENDS = ("gloo", "nccl")

# Header: [version, n_tensors, total_numel, fingerprint, n_groups, (dtype code, numel) * MAX_GROUPS]
MAX_GROUPS = 8
HEADER_LEN = 5 + 2 * MAX_GROUPS
_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64,
           torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


class WeightLayoutError(ValueError):
    """The receiver's tensors do not match what the sender sent (count, numel, shapes or dtypes)."""


# ---------------------------------------------------------------------------- addresses


def node_ip() -> str:
    """This node's IP as Ray sees it (reachable by the other nodes), else 127.0.0.1."""
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def free_port(ipv6: bool = False) -> int:
    """A TCP port that is free on every interface of this node right now (the OS picks it).

    The socket is closed before returning, so another process could take the port before
    the group's rank 0 binds it (the rendezvous then fails within its timeout): rebuild
    the group with a new port.
    """
    with socket.socket(socket.AF_INET6 if ipv6 else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))  # free on every interface, so free on the node's address the store binds
        return int(sock.getsockname()[1])


def local_init_method(host: str | None = None) -> str:
    """``tcp://<node ip>:<free port>`` for a group whose rank 0 runs in THIS process's node.

    Call it on rank 0's node (in the learner actor), not on the driver.
    """
    host = host or node_ip()
    port = free_port(ipv6=":" in host)
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def _rendezvous(init_method: str, rank: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    """The group's rendezvous store at ``tcp://host:port``. torch's own (``init_method=``) listens
    on every interface of rank 0's node; here rank 0 listens on ``host`` only, through a socket
    bound there and handed to the store."""
    url = urllib.parse.urlsplit(init_method)
    host, port, timeout = url.hostname, url.port, _dt.timedelta(seconds=timeout_s)
    if url.scheme != "tcp" or not host or not port:
        raise ValueError(f"WeightGroup init_method must be tcp://host:port, got {init_method!r}")
    if rank != 0:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(max(128, world_size))
    except OSError:
        sock.close()
        raise
    return dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False,
                         master_listen_fd=sock.detach())


# ---------------------------------------------------------------------------- the group


class WeightGroup:
    """A torch.distributed group for broadcasting weights from rank 0 (the default process group).

    ``init_method`` is ``tcp://host:port`` with rank 0's host; the constructor blocks until
    all ``world_size`` ranks have joined or ``timeout_s`` passes (then it raises).
    ``timeout_s`` also bounds each later collective under gloo; under NCCL, torch's
    watchdog enforces it (by default it tears the process down when a collective times out).
    ``device``: where the buffers live; default ``cuda`` (current device) for NCCL, ``cpu``
    for gloo. The tensors given may live anywhere: they are copied to and from ``device``.
    ``group_name`` only labels the group in logs and errors.
    ``keep_buffers``: keep each dtype's flat buffer for the next broadcast (default). It costs one
    extra copy of the weights in memory on ``device`` for the group's life (on the learner's GPU
    under NCCL) and saves allocating and first-touching it every time, which on CPU costs about
    as much as the transfer itself. False allocates per broadcast (``_flatten_dense_tensors``).
    """

    def __init__(self, init_method: str, rank: int, world_size: int, backend: str = "gloo",
                 timeout_s: float = 300.0, group_name: str = "weights",
                 device: str | torch.device | None = None, keep_buffers: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"WeightGroup backend must be one of {BACKENDS}, got {backend!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"WeightGroup needs 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        if timeout_s <= 0:
            raise ValueError(f"WeightGroup timeout_s must be > 0, got {timeout_s}")
        if not dist.is_available():
            raise RuntimeError("torch.distributed is not available in this torch build")
        if dist.is_initialized():
            raise RuntimeError(
                f"WeightGroup {group_name!r}: this process already has a torch.distributed default process "
                "group; a process can be in one WeightGroup at a time: destroy() the old one first")
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise RuntimeError(f"WeightGroup {group_name!r}: backend 'nccl' needs CUDA, which is not available "
                                   "here; use 'gloo'")
            device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
            if device.type != "cuda":
                raise ValueError(f"WeightGroup {group_name!r}: backend 'nccl' needs a cuda device, got {device}")
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)
        else:
            device = torch.device(device) if device is not None else torch.device("cpu")
            if device.type != "cpu":
                raise ValueError(f"WeightGroup {group_name!r}: backend 'gloo' uses cpu buffers here, got {device}")
        self.init_method, self.rank, self.world_size = init_method, rank, world_size
        self.backend, self.device, self.group_name, self.timeout_s = backend, device, group_name, timeout_s
        self.keep_buffers = keep_buffers
        self._buffers: dict[tuple[torch.dtype, int], torch.Tensor] = {}
        start = time.perf_counter()
        _reset_group_count()
        try:
            # device_id (NCCL): the communicator is built now, so a bad placement (two ranks on one
            # GPU: "Duplicate GPU detected") fails here rather than at the first broadcast.
            dist.init_process_group(backend=backend, store=_rendezvous(init_method, rank, world_size, timeout_s),
                                    rank=rank, world_size=world_size,
                                    timeout=_dt.timedelta(seconds=timeout_s),
                                    **({"device_id": device} if backend == "nccl" else {}))
        except Exception as err:  # rendezvous timeout, port taken, unreachable host...
            if dist.is_initialized():
                dist.destroy_process_group()
            _reset_group_count()
            lines = error_lines(err)
            # NCCL puts the useful part ("Duplicate GPU detected ...") on its last line.
            detail = "; ".join(dict.fromkeys(lines[:1] + lines[-1:]))
            raise RuntimeError(f"WeightGroup {group_name!r}: rank {rank}/{world_size} could not join {init_method} "
                               f"with {backend} (timeout {timeout_s:g}s): {type(err).__name__}: {detail}") from err
        self._alive = True
        self._broken: str | None = None
        logger.info("weight group %r: rank %d/%d joined %s (%s on %s) in %.2fs", group_name, rank, world_size,
                    init_method, backend, device, time.perf_counter() - start)

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def broken(self) -> str | None:
        """Why a collective failed (timeout, peer gone), or None. A broken group must be rebuilt."""
        return self._broken

    def _check_alive(self) -> None:
        if not self._alive:
            raise RuntimeError(f"WeightGroup {self.group_name!r} was destroyed; join a new one")
        if self._broken:
            raise RuntimeError(f"WeightGroup {self.group_name!r} is broken ({self._broken}): destroy it and "
                               "build a new group on a new port")

    def _broadcast(self, buf: torch.Tensor) -> None:
        """``dist.broadcast(buf, src=0)``; a failure (timeout, a peer gone) marks the group broken."""
        try:
            dist.broadcast(buf, src=0)
        except Exception as err:
            self._broken = f"{type(err).__name__}: {first_line(err)}"[:300]
            raise RuntimeError(f"WeightGroup {self.group_name!r} rank {self.rank}/{self.world_size}: broadcast "
                               f"failed ({self._broken}); a peer died or timed out after {self.timeout_s:g}s: "
                               "destroy this group and build a new one on a new port") from err

    def broadcast_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Rank 0's tensors to every rank, in place: one flat buffer per dtype, ``dist.broadcast(src=0)``.

        Every rank must pass tensors of the same count, shapes and dtypes, in the same order
        (:func:`send` / :func:`receive` check that first). Receivers' tensors are only written
        after every buffer has arrived.
        """
        self._check_alive()
        received = []
        for dtype, members in _dtype_groups(tensors):
            group = [tensors[i] for i in members]
            if self.rank == 0:
                self._broadcast(self._flat(group, dtype))
            else:
                buf = self._buffer(dtype, sum(t.numel() for t in group))
                self._broadcast(buf)
                received.append((buf, group))
        with torch.no_grad():
            for buf, group in received:
                for tensor, part in zip(group, _unflatten_dense_tensors(buf, group)):
                    tensor.copy_(part)

    def broadcast_header(self, header: torch.Tensor | None = None) -> torch.Tensor:
        """Rank 0's int64 header (HEADER_LEN,) to every rank; returns it on CPU."""
        self._check_alive()
        buf = torch.zeros(HEADER_LEN, dtype=torch.int64, device=self.device)
        if self.rank == 0:
            if header is None or header.shape != (HEADER_LEN,):
                raise ValueError(f"rank 0 must give an int64 header of shape ({HEADER_LEN},)")
            buf.copy_(header)
        self._broadcast(buf)
        return buf.cpu()

    def _flat(self, group: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """The tensors of one dtype, flattened into one contiguous buffer on ``self.device``."""
        with torch.no_grad():
            if not self.keep_buffers:
                return _flatten_dense_tensors([t.detach() for t in group]).to(self.device)
            buf = self._buffer(dtype, sum(t.numel() for t in group))
            for part, tensor in zip(_unflatten_dense_tensors(buf, group), group):
                part.copy_(tensor)  # views of buf; copies across devices where the tensors live elsewhere
            return buf

    def _buffer(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        """A flat buffer on ``self.device``: the kept one for (dtype, numel), or a fresh one."""
        if not self.keep_buffers:
            return torch.empty(numel, dtype=dtype, device=self.device)
        buf = self._buffers.get((dtype, numel))
        if buf is None:
            buf = self._buffers[(dtype, numel)] = torch.empty(numel, dtype=dtype, device=self.device)
        return buf

    def destroy(self) -> None:
        """Leaves the group (local only; safe to call twice). A new group may then be built."""
        if not self._alive:
            return
        self._alive = False
        self._buffers.clear()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as err:  # a peer is gone; the local state is dropped anyway
                logger.warning("weight group %r: destroy_process_group failed (%s)", self.group_name, err)
        logger.info("weight group %r: rank %d left", self.group_name, self.rank)

    def __enter__(self) -> "WeightGroup":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()

    def __repr__(self) -> str:
        return (f"WeightGroup({self.group_name!r}, rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r}, device={self.device}, alive={self._alive}, broken={self._broken!r})")


def _reset_group_count() -> None:
    """Undo what a failed ``init_process_group`` leaves behind: torch names the default group by a
    per-process counter that it bumps BEFORE the rendezvous and resets only in
    ``destroy_process_group``. A process whose join once failed (timeout) would then use other
    store keys than a fresh peer, and every later rendezvous would time out. Only called while
    no default group exists, when the counter must be 0."""
    world = getattr(dist.distributed_c10d, "_world", None)
    if world is not None and hasattr(world, "group_count") and not dist.is_initialized():
        world.group_count = 0


# ---------------------------------------------------------------------------- send / receive


def lm_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The module's live tensors without tied duplicates (``modelhost.weights``), in state_dict
    order: what the learner sends (pass the causal LM, ``policy.pretrained_model``) and what a
    rollout worker receives into."""
    return list(distinct_tensors(module).values())


def send(group: WeightGroup, version: int, tensors: Sequence[torch.Tensor]) -> None:
    """Rank 0: the version and layout header, then the weights. Every other rank calls :func:`receive`."""
    if group.rank != 0:
        raise ValueError(f"send() is for rank 0; this is rank {group.rank}: call receive()")
    tensors = list(tensors)
    group.broadcast_header(make_header(int(version), tensors))
    group.broadcast_(tensors)


def receive(group: WeightGroup, tensors: Sequence[torch.Tensor]) -> int:
    """Ranks > 0: receives the header and the weights into ``tensors`` in place; returns the version.

    Raises WeightLayoutError (after draining the buffers, so no rank hangs, and with
    ``tensors`` untouched) when the sender's layout differs from ``tensors``'.
    """
    if group.rank == 0:
        raise ValueError("receive() is for ranks > 0; rank 0 calls send()")
    tensors = list(tensors)
    header = group.broadcast_header()
    sent = parse_header(header)
    mine = parse_header(make_header(sent["version"], tensors))
    if sent != mine:
        for dtype, numel in sent["groups"]:  # drain into scratch so the collective stays aligned
            group._broadcast(torch.empty(numel, dtype=dtype, device=group.device))
        raise WeightLayoutError(
            f"weight group {group.group_name!r} rank {group.rank}: the sender's weights (version {sent['version']}: "
            f"{sent['n_tensors']} tensors, {sent['numel']} values, {_fmt_groups(sent['groups'])}) do not match "
            f"this receiver's ({mine['n_tensors']} tensors, {mine['numel']} values, {_fmt_groups(mine['groups'])}"
            f"{', same sizes but different shapes/dtypes' if sent['numel'] == mine['numel'] else ''}): both sides "
            "must list the causal LM's state_dict tensors without tied duplicates, from the same model class")
    group.broadcast_(tensors)
    return sent["version"]


# ---------------------------------------------------------------------------- layout


def _dtype_groups(tensors: Sequence[torch.Tensor]) -> list[tuple[torch.dtype, list[int]]]:
    """Indices of the tensors per dtype, dtypes in order of first appearance."""
    groups: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(t.dtype, []).append(i)
    return list(groups.items())


def make_header(version: int, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The int64 header (HEADER_LEN,) describing ``tensors``: version, count, numel, fingerprint, groups."""
    groups = _dtype_groups(tensors)
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"at most {MAX_GROUPS} dtypes per broadcast, got {len(groups)}")
    digest = hashlib.blake2b(digest_size=8)
    for t in tensors:
        if t.dtype not in _DTYPE_CODE:
            raise ValueError(f"dtype {t.dtype} cannot be broadcast (supported: {_DTYPES})")
        digest.update(f"{t.dtype}{tuple(t.shape)};".encode())
    fingerprint = int.from_bytes(digest.digest(), "little", signed=True)
    values = [int(version), len(tensors), sum(t.numel() for t in tensors), fingerprint, len(groups)]
    for dtype, members in groups:
        values += [_DTYPE_CODE[dtype], sum(tensors[i].numel() for i in members)]
    values += [0] * (HEADER_LEN - len(values))
    return torch.tensor(values, dtype=torch.int64)


def parse_header(header: torch.Tensor) -> dict:
    v = [int(x) for x in header.tolist()]
    groups = [(_DTYPES[v[5 + 2 * g]], v[6 + 2 * g]) for g in range(v[4])]
    return {"version": v[0], "n_tensors": v[1], "numel": v[2], "fingerprint": v[3], "groups": groups}


def _fmt_groups(groups: Iterable[tuple[torch.dtype, int]]) -> str:
    return ", ".join(f"{str(d).removeprefix('torch.')}: {n}" for d, n in groups)
