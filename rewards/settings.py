"""The reward side's own settings: which sources score a rollout, and how the server batches.

A reward is one source or a weighted mix of several (``RewardSettings.sources``), each a
sequence classifier (``model``), a Python function (``function``, ``MODULE:NAME``) or an
HTTP endpoint (``url``). With no sources given, the reward is the classifier of ``model``
alone (the recipe); ``function`` or ``url`` name a single source instead. Each value is
checked here, where it is declared, so a bad one stops the run before anything starts.
Imports nothing heavy: the learner's config tree embeds these dataclasses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# Upper bounds: a larger value would exhaust memory or overflow a timer, never help.
MAX_BATCH = 65_536
MAX_LENGTH = 1_000_000
MAX_WAIT_MS = 600_000.0
MAX_TIMEOUT_S = 3_600.0
MAX_RETRIES = 10
MAX_THREADS = 1_024
KINDS = ("model", "function", "url")


def _bounded(name: str, value: float, low: float, high: float) -> None:
    """ValueError naming ``name`` unless ``low <= value <= high`` (and finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} ({value!r}) must be a finite number")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"{name} ({value!r}) must be a number in [{low:g}, {high:g}]")


def check_function_name(name: str, value: str) -> None:
    """``MODULE:NAME`` with both parts present (whether it imports is checked before Ray starts)."""
    module, sep, attr = value.partition(":")
    if not sep or not module.strip() or not attr.strip():
        raise ValueError(f"{name} ({value!r}) must be MODULE:NAME, e.g. my_rewards:brevity "
                         "(MODULE on PYTHONPATH or in the working directory)")


def check_url(name: str, value: str) -> None:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{name} ({value!r}) must be an http:// or https:// URL")


@dataclass
class SourceSpec:
    """One source of a reward mix: a name, a weight, and exactly one of model / function / url."""

    name: str = ""
    """the statistic's name: env/reward/<name>"""
    weight: float = 1.0
    """reward = sum over sources of weight * the source's score, per text"""
    model: str = ""
    """a sequence classifier (hub id or local folder): the raw logit of positive_label"""
    function: str = ""
    """MODULE:NAME of a Python function NAME(prompts, responses) -> one float per pair"""
    url: str = ""
    """an HTTP endpoint: POST {"prompts": [...], "responses": [...]} -> {"rewards": [...]}"""
    positive_label: str = ""
    """a model source's label (empty: reward.positive_label)"""

    def __post_init__(self) -> None:
        where = f"reward.sources '{self.name}'"
        if not self.name or not all(c.isalnum() or c in "-_." for c in self.name):
            raise ValueError(f"reward.sources: each source needs a name of letters, digits, '-', '_' or '.' "
                             f"(got {self.name!r})")
        _bounded(f"{where}: weight", self.weight, -1e6, 1e6)
        given = [kind for kind in KINDS if getattr(self, kind)]
        if len(given) != 1:
            raise ValueError(f"{where} needs exactly one of model, function, url (got {', '.join(given) or 'none'})")
        if self.function:
            check_function_name(f"{where}: function", self.function)
        if self.url:
            check_url(f"{where}: url", self.url)

    @property
    def kind(self) -> str:
        return next(kind for kind in KINDS if getattr(self, kind))


@dataclass
class RewardSettings:
    """The reward side's own config (the learner's config tree hands it over)."""

    model: str = "lvwerra/distilbert-imdb"
    """Hub id or local `save_pretrained` folder (tried as a local folder first)."""
    positive_label: str = "POSITIVE"
    """Reward = raw logit of this label, found by name in config.id2label, never by position."""
    max_length: int = 512
    """Tokenizer truncation, in classifier tokens (DistilBERT has 512 positions)."""
    device: str = "auto"
    """"auto": cuda if this process sees a GPU, else cpu; or any torch device string."""
    torch_threads: int = 1
    """torch intra-op threads of the scoring process, set once at start-up (the driver gives a
    reward actor every core: it scores while the rollout actors wait for it)."""
    max_batch_size: int = 256
    """Most texts in one forward pass (the server's merged batches and the scorer's chunks)."""
    max_wait_ms: float = 1000.0
    """Server: the longest the first queued request waits for others to join its pass; a pass
    starts earlier once every rollout actor of the replica has asked (rewards/server.py)."""
    function: str = ""
    """instead of the classifier, a Python reward function NAME(prompts, responses) -> one float
    per pair, as MODULE:NAME (MODULE on PYTHONPATH or in the working directory)."""
    url: str = ""
    """instead of the classifier, an HTTP reward endpoint:
    POST {"prompts": [...], "responses": [...]} -> {"rewards": [...]}"""
    timeout_s: float = 30.0
    """HTTP sources: the longest wait for one answer"""
    retries: int = 2
    """HTTP sources: further tries after a failed one (connection refused, timeout, 5xx)"""
    sources: list[SourceSpec] = field(default_factory=list)
    """YAML only: a weighted mix, a list of {name, weight, and one of model / function / url}"""

    def __post_init__(self) -> None:
        _bounded("max_batch_size", self.max_batch_size, 1, MAX_BATCH)
        _bounded("max_length", self.max_length, 1, MAX_LENGTH)
        _bounded("max_wait_ms", self.max_wait_ms, 0, MAX_WAIT_MS)
        _bounded("torch_threads", self.torch_threads, 1, MAX_THREADS)
        _bounded("timeout_s", self.timeout_s, 0.001, MAX_TIMEOUT_S)
        _bounded("retries", self.retries, 0, MAX_RETRIES)
        for name in ("max_batch_size", "max_length", "torch_threads", "retries"):
            if not isinstance(getattr(self, name), int):
                raise ValueError(f"{name} ({getattr(self, name)!r}) must be a whole number")
        if self.function:
            check_function_name("function", self.function)
        if self.url:
            check_url("url", self.url)
        shortcuts = [n for n in ("function", "url") if getattr(self, n)] + (["sources"] if self.sources else [])
        if len(shortcuts) > 1:
            raise ValueError(f"give one of function, url, sources (got {', '.join(shortcuts)})")
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in self.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: names must differ (got {names})")

    def source_specs(self) -> list[SourceSpec]:
        """The sources that make the reward: the mix, or the one source the shortcuts name."""
        if self.sources:
            return list(self.sources)
        if self.function:
            return [SourceSpec(name=self.function.partition(":")[2].strip(), function=self.function)]
        if self.url:
            return [SourceSpec(name="url", url=self.url)]
        return [SourceSpec(name="model", model=self.model)]
