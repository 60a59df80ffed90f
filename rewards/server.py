"""A batching reward server: one forward pass for the score requests of many rollout actors.

Each rollout actor asks for a few dozen rewards at a time; scoring them one request at a
time leaves the classifier mostly idle on launch overhead. The server queues requests and
a single batching loop merges those that arrive close together (until `max_batch_size`
texts, or `max_wait_ms` after the oldest waiting request arrived) into one forward pass,
then hands each caller its own slice.

The driver spawns it as an async Ray actor, so many `score` calls wait at once:

    server = ray.remote(num_cpus=0, max_concurrency=64)(RewardServer).remote(settings)
    scores = ray.get(server.score.remote(texts))

Replicas are independent: each holds its own model, queue and statistics. The class is
plain Python and also runs under bare asyncio (the tests do both).
"""
from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rewards.scorer import RewardSettings, SentimentScorer

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    """One caller's texts; scored possibly across several forward passes, answered once."""

    texts: list[str]
    future: asyncio.Future
    arrived: float  # event-loop time of the score() call
    scores: list[float] = field(default_factory=list)  # filled in order as slices are scored
    taken: int = 0  # texts already handed to a forward pass


@dataclass
class _Slice:
    """texts[start:stop] of one request, as placed in a merged batch."""

    request: _Request
    start: int
    stop: int


class RewardServer:
    """Async Ray actor body: batches score requests of all rollout actors."""

    def __init__(self, settings: RewardSettings) -> None:
        self.settings = settings
        self.scorer = SentimentScorer(settings)
        # One thread: forward passes run one at a time, off the event loop, so new
        # requests keep queuing while a batch is scored.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")
        self._pending: deque[_Request] = deque()
        self._pending_texts = 0
        # asyncio objects are made on the first score() call, inside the loop that runs it
        # (Ray's actor loop or the caller's), not in __init__, which may run outside it.
        self._arrived: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._metric = _batch_size_metric()
        self.reset_stats()

    async def score(self, texts: list[str]) -> list[float]:
        """Raw POSITIVE logit of each text, in order; merged with concurrent requests."""
        _check_texts(texts)
        self._requests += 1
        if not texts:
            return []
        loop = asyncio.get_running_loop()
        self._ensure_batcher()
        request = _Request(list(texts), loop.create_future(), loop.time())
        self._pending.append(request)
        self._pending_texts += len(request.texts)
        self._arrived.set()
        return await request.future

    def stats(self) -> dict:
        """Counts since the last reset: requests, forward passes, texts per pass."""
        passes = len(self._batch_sizes)
        return {
            "requests": self._requests,
            "forward_passes": passes,
            "texts": sum(self._batch_sizes),
            "batch_sizes": list(self._batch_sizes),
            "mean_batch_size": sum(self._batch_sizes) / passes if passes else 0.0,
        }

    def reset_stats(self) -> None:
        self._requests = 0
        self._batch_sizes: list[int] = []

    def ping(self) -> dict:
        """Where this replica runs (placement checks in the driver and tests)."""
        return {"pid": os.getpid(), "node_id": _ray_node_id(), "device": str(self.scorer.device)}

    def _ensure_batcher(self) -> None:
        if self._arrived is None:
            self._arrived = asyncio.Event()
        # Restarted if it ever died, so a bug in the loop cannot leave callers waiting forever.
        if self._batcher is None or self._batcher.done():
            self._batcher = asyncio.get_running_loop().create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        while True:
            await self._wait_for_batch()
            batch = self._take_batch()
            if batch:
                await self._run_batch(batch)

    async def _wait_for_batch(self) -> None:
        """Until max_batch_size texts wait, or max_wait_ms passed since the oldest arrived."""
        loop = asyncio.get_running_loop()
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._pending[0].arrived + self.settings.max_wait_ms / 1000.0
        while self._pending_texts < self.settings.max_batch_size:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except asyncio.TimeoutError:
                return

    def _take_batch(self) -> list[_Slice]:
        """Up to max_batch_size texts from the queue head; a request may be split across passes."""
        batch: list[_Slice] = []
        room = self.settings.max_batch_size
        while self._pending and room > 0:
            request = self._pending[0]
            if request.future.done():  # caller cancelled, or an earlier slice failed
                self._drop_head()
                continue
            stop = min(len(request.texts), request.taken + room)
            batch.append(_Slice(request, request.taken, stop))
            room -= stop - request.taken
            self._pending_texts -= stop - request.taken
            request.taken = stop
            if stop == len(request.texts):
                self._pending.popleft()
        return batch

    def _drop_head(self) -> None:
        request = self._pending.popleft()
        self._pending_texts -= len(request.texts) - request.taken

    async def _run_batch(self, batch: list[_Slice]) -> None:
        texts = [text for part in batch for text in part.request.texts[part.start:part.stop]]
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._forward, texts)
        except Exception as error:  # every caller of the batch gets it; none is left hanging
            logger.warning("reward forward pass of %d texts failed: %r", len(texts), error)
            for part in batch:
                if not part.request.future.done():
                    part.request.future.set_exception(error)
            return
        self._batch_sizes.append(len(texts))
        if self._metric is not None:
            self._metric.observe(len(texts))
        _deliver(batch, scores)

    def _forward(self, texts: list[str]) -> list[float]:
        """The one forward pass (runs in the executor thread)."""
        return self.scorer.score(texts)


def _deliver(batch: list[_Slice], scores: list[float]) -> None:
    """Append each slice's scores to its request; answer requests that are complete."""
    offset = 0
    for part in batch:
        count = part.stop - part.start
        request = part.request
        request.scores.extend(scores[offset:offset + count])
        offset += count
        if len(request.scores) == len(request.texts) and not request.future.done():
            request.future.set_result(request.scores)


def _check_texts(texts: list[str]) -> None:
    """Reject bad input at the door, so it fails only its own caller, not a merged batch."""
    if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
        raise TypeError("RewardServer.score takes a list of str (decoded query + response texts)")


def _batch_size_metric():
    """Texts per forward pass as a Ray metric (Prometheus: ray_ppo_reward_batch_size), when in Ray."""
    try:
        import ray
        from ray.util.metrics import Histogram
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    return Histogram("ppo_reward_batch_size", description="texts per reward forward pass",
                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])


def _ray_node_id() -> str | None:
    try:
        import ray  # optional: the server also runs without Ray
    except ImportError:
        return None
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
