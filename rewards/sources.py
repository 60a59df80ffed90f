"""Reward sources and their weighted mix: what the reward server calls for each merged pass.

A source scores a list of (prompt, response) pairs with one float each:

- ``ClassifierSource``: a sequence classifier's raw logit of a label on ``prompt + response``
  (``SentimentScorer``, the recipe's reward);
- ``FunctionSource``: a Python function ``NAME(prompts, responses)``, imported from
  ``MODULE:NAME`` or given as an object (the Python API; Ray ships it by value);
- ``HttpSource``: POST ``{"prompts": [...], "responses": [...]}`` to a URL, read
  ``{"rewards": [...]}``; a timeout per try and a bounded number of retries.

``RewardMix`` checks every source's answer (one finite number per pair, else a
``RewardSourceError`` naming the source) and sums ``weight * score`` per pair, in the order
the sources are listed. Never imports ray, learner/ or actors/.
"""
from __future__ import annotations

import importlib
import inspect
import json
import logging
import math
import numbers
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from rewards.settings import RewardSettings, SourceSpec

logger = logging.getLogger(__name__)

# The module part of ``reward.function`` for a function given as a Python object (learner.train(reward=...)).
PYTHON_OBJECT = "<python>"
RewardFunction = Callable[[list[str], list[str]], Any]


class RewardSourceError(RuntimeError):
    """A reward source failed or answered wrongly; the one-line message names the source."""


class Source(Protocol):
    name: str

    def score(self, prompts: list[str], responses: list[str]) -> list[Any]: ...


def load_function(spec: str, given: dict[str, RewardFunction] | None = None) -> RewardFunction:
    """The function ``MODULE:NAME`` names (or the object given for it), checked to be callable as
    ``NAME(prompts, responses)``. ValueError with a one-line reason otherwise. The working
    directory is searched too, as ``python -m`` does for the driver."""
    module_name, _, attr = (part.strip() for part in spec.partition(":"))
    if given and spec in given:
        fn = given[spec]
    elif module_name == PYTHON_OBJECT:
        raise ValueError(f"'{spec}' was a Python object given to learner.train(reward=...); pass it again there")
    else:
        if str(Path.cwd()) not in sys.path and "" not in sys.path:
            sys.path.append(str(Path.cwd()))
        try:
            module = importlib.import_module(module_name)
        except Exception as err:  # noqa: BLE001 - an import can raise anything; one line says what
            raise ValueError(f"cannot import module '{module_name}' ({type(err).__name__}: {err}); put it on "
                             "PYTHONPATH or in the working directory") from None
        fn = module
        for part in attr.split("."):
            fn = getattr(fn, part, None)
            if fn is None:
                raise ValueError(f"module '{module_name}' has no '{attr}'")
    check_callable(spec, fn)
    return fn


def check_callable(spec: str, fn: Any) -> None:
    """ValueError unless ``fn(prompts, responses)`` is a valid call."""
    if not callable(fn):
        raise ValueError(f"'{spec}' is a {type(fn).__name__}, not a function")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise ValueError(f"'{spec}' must take two positional arguments (prompts, responses)") from None
    except ValueError:  # no signature to read (some builtins): the first call will tell
        pass


def check_scores(name: str, values: Any, n: int) -> list[float]:
    """``values`` as n finite floats, or a RewardSourceError naming the source and what is wrong."""
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardSourceError(f"reward source '{name}' returned a {type(values).__name__}, not a list of numbers")
    if len(values) != n:
        raise RewardSourceError(f"reward source '{name}' returned {len(values)} values for {n} texts")
    out = []
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise RewardSourceError(f"reward source '{name}' returned a non-number for text {i}: {value!r:.60}")
        if not math.isfinite(value):
            raise RewardSourceError(f"reward source '{name}' returned a non-finite value for text {i}: {value}")
        out.append(float(value))
    return out


class ClassifierSource:
    """A sequence classifier's raw logit of one label on ``prompt + response`` (the recipe)."""

    def __init__(self, name: str, settings: RewardSettings) -> None:
        from rewards.scorer import SentimentScorer  # torch + transformers, only where a classifier is used

        self.name = name
        self.scorer = SentimentScorer(settings)
        self.device = self.scorer.device

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.scorer.score([p + r for p, r in zip(prompts, responses)])


class FunctionSource:
    def __init__(self, name: str, fn: RewardFunction) -> None:
        self.name, self.fn = name, fn

    def score(self, prompts: list[str], responses: list[str]) -> Any:
        return self.fn(list(prompts), list(responses))


class HttpSource:
    """POST JSON to ``url``; connection errors, timeouts and 5xx answers are tried again."""

    def __init__(self, name: str, url: str, timeout_s: float, retries: int, backoff_s: float = 0.5) -> None:
        self.name, self.url, self.timeout_s, self.retries, self.backoff_s = name, url, timeout_s, retries, backoff_s

    def score(self, prompts: list[str], responses: list[str]) -> Any:
        body = json.dumps({"prompts": list(prompts), "responses": list(responses)}).encode()
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * attempt)
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as answer:
                    return _rewards_of(self.name, answer.read())
            except urllib.error.HTTPError as err:
                if err.code < 500:  # the endpoint refuses the request: trying again will not help
                    raise RewardSourceError(f"reward source '{self.name}' ({self.url}) answered HTTP {err.code}") \
                        from None
                last = f"HTTP {err.code}"
            except (OSError, TimeoutError) as err:  # URLError, refused, reset, timed out
                last = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
        raise RewardSourceError(f"reward source '{self.name}' ({self.url}) did not answer after "
                                f"{self.retries + 1} tries ({last})")


def _rewards_of(name: str, raw: bytes) -> Any:
    try:
        answer = json.loads(raw)
    except ValueError:
        raise RewardSourceError(f"reward source '{name}' answered something that is not JSON: {raw[:60]!r}") from None
    if not isinstance(answer, dict) or "rewards" not in answer:
        raise RewardSourceError(f"reward source '{name}' answered without a \"rewards\" list: {str(answer)[:60]}")
    return answer["rewards"]


def build_source(spec: SourceSpec, settings: RewardSettings,
                 given: dict[str, RewardFunction] | None = None) -> Source:
    """The source a spec names; a model source takes the settings' batching, device and threads."""
    if spec.model:
        label = spec.positive_label or settings.positive_label
        return ClassifierSource(spec.name, replace(settings, model=spec.model, positive_label=label,
                                                  function="", url="", sources=[]))
    if spec.function:
        try:
            return FunctionSource(spec.name, load_function(spec.function, given))
        except ValueError as err:
            raise RewardSourceError(f"reward source '{spec.name}': {err}") from None
    return HttpSource(spec.name, spec.url, settings.timeout_s, settings.retries)


class RewardMix:
    """The reward of each (prompt, response): sum over sources of weight * score, in source order."""

    def __init__(self, settings: RewardSettings, given: dict[str, RewardFunction] | None = None) -> None:
        self.specs = settings.source_specs()
        self.sources = [build_source(spec, settings, given) for spec in self.specs]
        self.device = next((s.device for s in self.sources if isinstance(s, ClassifierSource)), "cpu")

    def score(self, prompts: list[str], responses: list[str]) -> tuple[list[float], dict[str, list[float]]]:
        """(the mixed reward per pair, each source's scores by name); RewardSourceError names a
        source that raised or answered wrongly."""
        n = len(prompts)
        per_source: dict[str, list[float]] = {}
        for spec, source in zip(self.specs, self.sources):
            try:
                values = source.score(prompts, responses)
            except RewardSourceError:
                raise
            except Exception as err:  # noqa: BLE001 - a user's function may raise anything
                raise RewardSourceError(f"reward source '{spec.name}' raised {type(err).__name__}: "
                                        f"{str(err).splitlines()[0] if str(err) else ''}".rstrip(": ")) from None
            per_source[spec.name] = check_scores(spec.name, values, n)
        mixed = [0.0] * n
        for spec in self.specs:
            mixed = [total + spec.weight * s for total, s in zip(mixed, per_source[spec.name])]
        return mixed, per_source
