"""A batching reward server: one forward pass for the score requests of many rollout actors.

Each rollout actor asks for a few dozen rewards at a time; scoring them one request at a
time leaves the classifier mostly idle on launch overhead. The server queues the texts of
all requests and one batching loop takes them in arrival order into forward passes of at
most ``max_batch_size`` texts. A pass starts once that many texts wait, or once every one of
its ``callers`` (the rollout actors it serves, which the driver counts) has a request
waiting, or ``max_wait_ms`` after the oldest waiting text arrived, whichever comes first.
Each caller gets its own scores back in order, once all of its texts are scored (a large
request may span several passes).

Rollout actors that generate at the same time still finish up to several hundred
milliseconds apart, so a short window merges few of their requests. Counting the callers lets
the window be wide at no cost: the pass starts as soon as the last of them has asked, and the
window only bounds the wait for one that is slow or lost.

Why not ``ray.serve.batch``: it merges *calls*, up to a number of calls, while the bound
that matters here is texts per pass (memory and time of one forward pass). With it, a batch
of calls would hold anywhere from one to thousands of texts, and cutting that into passes
of ``max_batch_size`` would leave a part-full pass after every batch of calls, so passes
would be smaller and more numerous than here; it also needs the ``ray[serve]`` extra
(FastAPI, uvicorn, starlette) for one decorator. Queuing texts instead of calls keeps this
to three small async methods (``score``, ``_next_batch``, ``_run``).

The driver spawns it as an async Ray actor, so many ``score`` calls wait at once:

    server = ray.remote(num_cpus=0, max_concurrency=64)(RewardServer).remote(settings, callers=2)
    answer = ray.get(server.score.remote(prompts, responses))
    answer["rewards"], answer["sources"]  # the mixed reward per pair, each source's scores by name

Each pass scores its pairs with every source of the mix (``rewards.sources.RewardMix``); a
source that raises or answers wrongly (too few or too many values, a non-number, a
non-finite one) fails that pass's requests at once, each with the same one-line
``RewardSourceError`` naming the source.

Replicas are independent: each holds its own model, queue and statistics. The class is
plain Python and also runs under bare asyncio (the tests do both).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from modelhost.process import process_info
from rewards.settings import RewardSettings
from rewards.sources import RewardFunction, RewardMix, RewardSourceError

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    """One caller's (prompt, response) pairs, answered once every one of them is scored."""

    prompts: list[str]
    responses: list[str]
    future: asyncio.Future
    arrived: float  # event-loop time of the score() call
    scores: list[float] = field(default_factory=list)  # (n,) the mixed reward, once created
    sources: dict[str, list[float]] = field(default_factory=dict)  # name -> (n,) that source's scores
    left: int = 0  # pairs not scored yet

    def __post_init__(self) -> None:
        self.scores = [0.0] * len(self.prompts)
        self.left = len(self.prompts)

    def answer(self) -> dict:
        return {"rewards": self.scores, "sources": self.sources}


class RewardServer:
    """Async Ray actor body: batches score requests of all rollout actors."""

    def __init__(self, settings: RewardSettings, callers: int = 0,
                 functions: dict[str, RewardFunction] | None = None) -> None:
        """``callers``: how many rollout actors send requests here, one at a time each; a pass
        starts as soon as each has a request waiting. 0: unknown (wait for full passes or
        ``max_wait_ms``). ``functions``: Python reward functions given as objects, by the
        ``reward.function`` string that names them (``learner.train(reward=...)``)."""
        if callers < 0:
            raise ValueError(f"RewardServer callers must be >= 0, got {callers}")
        self.settings = settings
        self.callers = callers
        self.mix = RewardMix(settings, functions)
        # One thread: forward passes run one at a time, off the event loop, so new
        # requests keep queuing while a batch is scored.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward-forward")
        self._queue: deque[tuple[_Request, int]] = deque()  # (request, text index), arrival order
        self._queued_requests = 0  # requests with a text in the queue
        # asyncio objects are made on the first score() call, inside the loop that runs it
        # (Ray's actor loop or the caller's), not in __init__, which may run outside it.
        self._arrived: asyncio.Event | None = None
        self._batcher: asyncio.Task | None = None
        self._metric = _batch_size_metric()
        self.reset_stats()

    async def score(self, prompts: list[str], responses: list[str]) -> dict:
        """{"rewards": the mixed reward of each (prompt, response), "sources": {name: that source's
        scores}}, in order; merged with concurrent requests."""
        _check_texts(prompts, responses)
        self._requests += 1
        if not prompts:
            return {"rewards": [], "sources": {spec.name: [] for spec in self.mix.specs}}
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        # (Re)started if it ever died, so a bug in the loop cannot leave callers waiting forever.
        if self._batcher is None or self._batcher.done():
            self._batcher = loop.create_task(self._batch_loop())
        request = _Request(list(prompts), list(responses), loop.create_future(), loop.time())
        self._queue.extend((request, i) for i in range(len(prompts)))
        self._queued_requests += 1
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
        return process_info(self.mix.device)

    async def _batch_loop(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._run(batch)

    async def _next_batch(self) -> list[tuple[_Request, int]]:
        """Up to max_batch_size waiting texts, once that many wait, every caller has a request
        waiting, or max_wait_ms after the oldest arrived."""
        loop, most = asyncio.get_running_loop(), self.settings.max_batch_size
        while not self._queue:
            self._arrived.clear()
            await self._arrived.wait()
        deadline = self._queue[0][0].arrived + self.settings.max_wait_ms / 1000.0
        while (len(self._queue) < most and not 0 < self.callers <= self._queued_requests
               and loop.time() < deadline):
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), deadline - loop.time())
            except asyncio.TimeoutError:
                break
        batch: list[tuple[_Request, int]] = []
        while self._queue and len(batch) < most:
            request, i = self._queue.popleft()
            self._queued_requests -= i == len(request.prompts) - 1  # its last text leaves the queue
            if not request.future.done():  # else its caller was cancelled, or an earlier pass failed
                batch.append((request, i))
        return batch

    async def _run(self, batch: list[tuple[_Request, int]]) -> None:
        """One pass in the executor thread; each pair's scores go to its request."""
        prompts = [request.prompts[i] for request, i in batch]
        responses = [request.responses[i] for request, i in batch]
        try:
            scores, sources = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._forward, prompts, responses)
        except Exception as error:  # every caller of the batch gets it; none is left hanging
            # A source's own failure is the callers' one line to report; anything else is a bug here.
            (logger.debug if isinstance(error, RewardSourceError) else logger.warning)(
                "reward pass of %d texts failed: %r", len(prompts), error)
            for request, _ in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        self._batch_sizes.append(len(prompts))
        if self._metric is not None:
            self._metric.observe(len(prompts))
        for k, (request, i) in enumerate(batch):
            request.scores[i] = scores[k]
            for name, values in sources.items():
                request.sources.setdefault(name, [0.0] * len(request.prompts))[i] = values[k]
            request.left -= 1
            if request.left == 0 and not request.future.done():
                request.future.set_result(request.answer())

    def _forward(self, prompts: list[str], responses: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """The one pass over every source (runs in the executor thread)."""
        return self.mix.score(prompts, responses)


def _check_texts(prompts: list[str], responses: list[str]) -> None:
    """Reject bad input at the door, so it fails only its own caller, not a merged batch."""
    for texts in (prompts, responses):
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise TypeError("RewardServer.score takes two lists of str (decoded prompts and responses)")
    if len(prompts) != len(responses):
        raise ValueError(f"RewardServer.score got {len(prompts)} prompts and {len(responses)} responses")


def _batch_size_metric():
    """Texts per forward pass as a Ray metric (Prometheus: ray_ppo_reward_batch_size), when in Ray."""
    import ray
    from ray.util.metrics import Histogram

    if not ray.is_initialized():
        return None
    return Histogram("ppo_reward_batch_size", description="texts per reward forward pass",
                     boundaries=[1, 2, 4, 8, 16, 32, 64, 128, 256, 512])
