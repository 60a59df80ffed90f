"""Every remote wait of a run, bounded, and what to do when an actor is lost.

Rollout and reward actors are restarted by Ray (``max_restarts``); a call they failed is made
again once they answer, after the caller has given a restarted rollout actor the current
weights (``resend``). The learner is not restarted by Ray (its state lives in memory): the loss
of any of its ranks is raised as :class:`LearnerLost` and the driver starts a new group of ranks
(``replace_learner``) and loads the newest good checkpoint.

Deaths are counted per actor, not per failed call: after a failure every actor is pinged until
it answers, and each one that answers from a new process died once, however many calls its
death failed (one reward actor serves every rollout actor's shard). ``cluster.max_failures``
is the budget of deaths.

A restart is told by identity, not by pid: every actor's ``ping`` reports ``instance``, an id
its process made when it started (a pid can be reused by a restarted actor in a container or
on another node). Ray's ``ActorUnavailableError`` (temporarily unreachable) is waited for, not
counted as a death; a learner call it failed is made again once the learner answers, when
the call may be repeated. A replaced learner's old actor is killed, in case it still runs.

Handles need only ``handle.<method>.remote(...)`` and a ``ping`` method returning
``{"instance"}`` (or ``{"pid"}``); waiting goes through :class:`Calls`, so the unit tests drive
this with fake handles and no Ray.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modelhost.errors import one_line

__all__ = ["Calls", "Fleet", "LearnerLost", "RayCalls", "Recovery", "RunError", "one_line"]

log = logging.getLogger(__name__)


class RunError(RuntimeError):
    """The run cannot go on; the message says why and what to do."""


class LearnerLost(RuntimeError):
    """The learner actor died; the driver starts a new one from the newest good checkpoint."""


class Calls(Protocol):
    """How remote results are waited for (Ray in a run, fakes in the tests)."""

    lost: tuple[type[BaseException], ...]  # errors that mean "the actor is gone"
    unavailable: tuple[type[BaseException], ...]  # those of them that may pass: the actor is unreachable
    timeout: type[BaseException]  # what ``get`` raises when time runs out

    def get(self, refs: Any, timeout_s: float) -> Any: ...

    def wait_one(self, refs: list[Any], timeout_s: float) -> Any | None: ...

    def kill(self, handle: Any) -> None: ...


class RayCalls:
    def __init__(self) -> None:
        import ray

        self.ray = ray
        self.lost = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        self.unavailable = (ray.exceptions.ActorUnavailableError,)
        self.timeout = ray.exceptions.GetTimeoutError

    def kill(self, handle: Any) -> None:
        try:
            self.ray.kill(handle, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone, or never started: nothing to kill
            pass

    def get(self, refs: Any, timeout_s: float) -> Any:
        return self.ray.get(refs, timeout=timeout_s)

    def wait_one(self, refs: list[Any], timeout_s: float) -> Any | None:
        done, _ = self.ray.wait(refs, num_returns=1, timeout=timeout_s)
        return done[0] if done else None


@dataclass
class Fleet:
    """The run's actor handles, by role. ``learner`` is the learner's rank 0, the one the
    driver talks to; ``other_ranks`` are its data-parallel peers (none for one process)."""

    learner: Any
    rollouts: list[Any]
    rewards: list[Any]
    other_ranks: list[Any] = field(default_factory=list)

    @property
    def learner_ranks(self) -> list[Any]:
        return [self.learner, *self.other_ranks]

    def named(self) -> dict[str, Any]:
        return {"learner": self.learner, **{f"rollout-{i}": a for i, a in enumerate(self.rollouts)},
                **{f"rewards-{i}": a for i, a in enumerate(self.rewards)}}


class Recovery:
    """Bounded waits; lost actors waited for or replaced, their deaths counted once each."""

    def __init__(self, fleet: Fleet, calls: Calls, timeout_s: float, max_failures: int,
                 start_learner: Callable[[], Any], poll_s: float = 0.5) -> None:
        self.fleet, self.calls, self.timeout_s, self.max_failures = fleet, calls, timeout_s, max_failures
        self.start_learner, self.poll_s = start_learner, poll_s
        self.deaths = 0
        self.pings: dict[str, dict] = {}  # each actor's last answer: pid, node, device

    def start(self) -> dict[str, dict]:
        """Every actor's ping (pid, node, device), once all have started."""
        named = self.fleet.named()
        self.pings = dict(zip(named, self.get([a.ping.remote() for a in named.values()], "actor start-up")))
        return self.pings

    def get(self, refs: Any, what: str) -> Any:
        """The results, or RunError naming what did not answer within cluster.call_timeout_s."""
        try:
            return self.calls.get(refs, self.timeout_s)
        except self.calls.timeout:
            raise RunError(f"{what} did not finish within cluster.call_timeout_s={self.timeout_s:g}s") from None

    def learner_call(self, refs: Any, what: str, again: Callable[[], Any] | None = None) -> Any:
        """``get`` for calls on the learner: its loss is LearnerLost. A call that may be repeated
        (``again`` makes it anew) and failed because the learner was unreachable is made again
        once the same learner answers; a step, which may have happened, is not repeated."""
        try:
            return self.get(refs, what)
        except self.calls.lost as err:
            if again is not None and isinstance(err, self.unavailable):
                ping = self._until_alive(self.fleet.learner, "the learner", restarts=False)
                if identity(ping) == identity(self.pings.get("learner", {})):
                    return self.learner_call(again(), what)
            raise LearnerLost(one_line(err)) from None

    @property
    def unavailable(self) -> tuple[type[BaseException], ...]:
        return getattr(self.calls, "unavailable", ())

    def learner_all(self, refs: list[Any], what: str) -> Any:
        """Rank 0's result of a call every learner rank runs (``refs`` in rank order). A lost rank
        is a lost learner, raised as soon as it is seen: the others may be waiting on it in a
        collective. A rank's error is raised as it is when every rank still answers (an error
        in the step itself, which every rank meets alike), else it is the learner's loss."""
        pending = list(refs)
        while pending:
            done = self.calls.wait_one(pending, self.timeout_s)
            if done is None:
                raise RunError(f"{what} did not finish within cluster.call_timeout_s={self.timeout_s:g}s")
            pending.remove(done)
            try:
                self.learner_call(done, what)
            except LearnerLost:
                raise
            except Exception as err:  # noqa: BLE001 - the error of the call, or of a collective a lost peer broke
                self.learner_call([rank.ping.remote() for rank in self.fleet.learner_ranks], what)
                raise err
        return self.learner_call(refs[0], what)

    def gather(self, calls: dict[int, Callable[[], Any]], what: str, resend: Callable[[list[int]], None]) -> list:
        """One call per rollout actor, results in index order. A call failed by a lost actor (the
        rollout actor or a reward actor under it) is made again once every actor answers, after
        ``resend`` has given each restarted rollout actor the current weights."""
        pending = {make(): i for i, make in calls.items()}
        results: dict[int, Any] = {}
        redone = dict.fromkeys(calls, 0)
        while pending:
            done = self.calls.wait_one(list(pending), self.timeout_s)
            if done is None:
                raise RunError(f"{what} did not finish within cluster.call_timeout_s={self.timeout_s:g}s")
            i = pending.pop(done)
            try:
                results[i] = self.calls.get(done, self.timeout_s)
                continue
            except Exception as err:  # noqa: BLE001 - Ray raises many types; is_lost sorts them
                if not self.is_lost(err):  # a real error in the call, not a lost actor
                    # the error stays the cause: the driver tells a reward source's failure apart
                    raise RunError(f"{what} on rollout-{i} failed: {one_line(err)}") from err
                failure = err
            restarted = self.count_deaths(failure, f"{what} of rollout-{i}")
            redone[i] += 1
            if redone[i] > self.max_failures + 1:  # lost again and again, yet nobody died
                raise RunError(f"{what} on rollout-{i} failed {redone[i]} times: {one_line(failure)}")
            resend([int(name.split("-")[1]) for name in restarted if name.startswith("rollout-")])
            pending[calls[i]()] = i
        return [results[i] for i in sorted(results)]

    def is_lost(self, err: BaseException) -> bool:
        """The actor called (or, under a rollout call, a reward actor it called) is gone."""
        return isinstance(err, self.calls.lost) or isinstance(getattr(err, "cause", None), self.calls.lost)

    def count_deaths(self, err: BaseException, what: str) -> list[str]:
        """Wait until every rollout and reward actor answers; each one answering from a new process
        died once. Returns their names; RunError once deaths exceed cluster.max_failures."""
        restarted = []
        for name, actor in self.fleet.named().items():
            if name != "learner":
                ping = self._until_alive(actor, name)
                if identity(ping) != identity(self.pings.get(name, {})):
                    restarted.append(name)
                    self.pings[name] = ping
        self._spend(restarted, what, err)
        if restarted:
            log.warning("%s died (%s); restarted, redoing its work (%d/%d deaths)", ", ".join(restarted),
                        one_line(err), self.deaths, self.max_failures)
        return restarted

    def replace_learner(self, reason: str) -> Any:
        """A new learner (its ranks in the lost one's bundles, ``start_learner`` returning their
        handles, rank 0 first, or a one-rank learner's handle), once rank 0 answers; returns rank 0. Every rank of the old one is
        killed first (an unreachable rank may still run, hold its bundle, or wait on the others
        in a collective). LearnerLost if the new one dies before it answers, a rank of it
        included while the ranks join their group."""
        self._spend(["learner"], "the learner", reason)
        for rank in self.fleet.learner_ranks:
            self.calls.kill(rank)
        try:
            new = self.start_learner()  # rank 0's handle, or every rank's
        except self.calls.lost as err:
            raise LearnerLost(f"a rank of the new learner died while the ranks joined ({one_line(err)})") from None
        self.fleet.learner, *self.fleet.other_ranks = new if isinstance(new, list) else [new]
        self.pings["learner"] = self._until_alive(self.fleet.learner, "the new learner", restarts=False)
        return self.fleet.learner

    def _spend(self, dead: list[str], what: str, err: BaseException | str) -> None:
        self.deaths += len(dead)
        if self.deaths > self.max_failures:
            why = err if isinstance(err, str) else one_line(err)
            raise RunError(f"{what} failed: {', '.join(dead)} died ({why}); {self.deaths} actor deaths exceed "
                           f"cluster.max_failures={self.max_failures}")

    def _until_alive(self, actor: Any, name: str, restarts: bool = True) -> dict:
        """The ping of ``actor`` once it answers, bounded. An unreachable actor is waited for; a
        dead one too where Ray restarts it (``restarts``), else (the learner) it is LearnerLost."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                return self.calls.get(actor.ping.remote(), max(1.0, deadline - time.monotonic()))
            except self.calls.lost as err:
                if not restarts and not isinstance(err, self.unavailable):
                    raise LearnerLost(one_line(err)) from None
                if time.monotonic() > deadline:
                    raise RunError(f"{name} did not come back within cluster.call_timeout_s") from None
                time.sleep(self.poll_s)
            except self.calls.timeout:
                raise RunError(f"{name} did not come back within cluster.call_timeout_s") from None


def identity(ping: dict) -> Any:
    """Which process answered a ping: the id it made at start-up (its pid where it reports none)."""
    return ping.get("instance", ping.get("pid"))
