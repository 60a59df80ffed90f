"""One tree of dataclasses holding every setting; the reference recipe is the default.

Sources, later ones winning: the defaults below (``docs/recipe.md``), an optional
YAML file (``--config file.yaml``, nested like the tree), then CLI flags named by their
dotted path (``--ppo.learning_rate 3e-4``; ``-`` and ``_`` are interchangeable). A few
short aliases exist for what everybody sets (``--policy``, ``--reward-model``,
``--dataset``, ``--steps``, ``--seed``). The result is validated once, at start-up.
tyro builds the command line and ``--help`` from the dataclasses, each flag's help being
the docstring under its field.

The rollout and reward sections are the actors' own dataclasses: each actor receives
only its section.
"""
from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import logging
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Sequence

import tyro
import yaml

from actors.rollout import RolloutSettings
from modelhost.loading import looks_local
from rewards.settings import RewardSettings, SourceSpec

try:  # tyro's hook for a refused command line (tyro >= 1.0.14; tyro keeps the module private)
    from tyro._errors import on_parse_error
except ImportError:  # a tyro without it: the refusal without its reason, but no panel either
    def on_parse_error(hook: Any) -> contextlib.AbstractContextManager:
        return contextlib.redirect_stderr(io.StringIO())


log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and says how to fix it."""


# Range rules for a section's numbers: (test, what the message says it must be).
POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")
UNIT = (lambda v: 0 <= v <= 1, "must lie in [0, 1]")
GPUS = (lambda v: v == -1 or 0 <= v <= 1024, "must be >= 0, or -1 for the default placement, and at most 1024")
WEEK_S = 7 * 24 * 3600.0


def between(low: float, high: float) -> tuple:
    """A rule with an upper bound: past it a value exhausts memory or time, or overflows a timer."""
    return (lambda v: low <= v <= high, f"must be >= {_num(low)} and <= {_num(high)}")


def above_zero_at_most(high: float) -> tuple:
    return (lambda v: 0 < v <= high, f"must be > 0 and <= {_num(high)}")


def _num(v: float) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


# A device: 'auto' or a torch device type, with an index where the type has several.
DEVICE = re.compile(r"^(auto|cpu|mps|meta|(cuda|xpu|hpu|npu)(:\d+)?)$")
# A Ray address: auto, local, host:port or ray://host:port (an IPv6 host in brackets).
ADDRESS = re.compile(r"^(auto|local|(ray://)?([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5}))$")


def check_ranges(section: str, obj: Any, rules: dict[str, tuple]) -> None:
    """ConfigError naming the first field of ``obj`` that breaks its rule."""
    for name, (ok, must) in rules.items():
        value = getattr(obj, name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{section}.{name} ({value}) must be a finite number")
        if not ok(value):
            raise ConfigError(f"{section}.{name} ({value}) {must}")


# A single data file, by its suffix: the `datasets` builder that reads it.
DATA_FILE_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
PROMPT_MODES = ("opening", "whole")


@dataclass
class DataConfig:
    dataset: str = "stanfordnlp/imdb"
    """hub dataset name, a local folder of parquet files named <split>.parquet, or one .jsonl, .csv or .parquet
    file (a single file is every split: data.split and data.eval_split then read it, unless they name a file)"""
    split: str = "train"
    """which split gives the training prompts (or a .jsonl/.csv/.parquet file of its own)"""
    text_column: str = "text"
    """the column holding the text (a review in the recipe)"""
    prompt_mode: str = "opening"
    """opening: a prompt is the first k policy tokens of a text, k uniform in [query_min_tokens,
    query_max_tokens] (the recipe); whole: the whole text is the prompt, cut from the left to its last
    query_max_tokens tokens"""
    chat_template: bool = False
    """wrap each prompt in the policy tokenizer's chat template (the text as the user's message, then the
    assistant's turn opened); a tokenizer without one is an error"""
    min_review_chars: int = -1
    """texts this long or shorter are left out; -1: 200 in opening mode (the recipe keeps 24,895 of 25,000
    reviews), 0 in whole mode (every non-empty text)"""
    query_min_tokens: int = 2
    """a query is the first k policy tokens of a review, k uniform in [min, max], drawn once per review
    (opening mode; whole mode ignores it)"""
    query_max_tokens: int = 7
    """see query_min_tokens; in whole mode the longest prompt, chat template included"""
    eval_split: str = "test"
    """the held-out split (or .jsonl/.csv/.parquet file) that run.eval_every scores"""
    eval_prompts: int = 256
    """held-out prompts scored by run.eval_every, the same ones every time (drawn with run.seed); fewer if the
    split holds fewer"""

    def __post_init__(self) -> None:
        check_ranges("data", self, {"min_review_chars": (lambda v: -1 <= v <= 10**7, "must be >= 0 and <= 10000000, "
                                                         "or -1 for the prompt mode's default"),
                                    "query_min_tokens": POSITIVE, "query_max_tokens": above_zero_at_most(4096),
                                    "eval_prompts": above_zero_at_most(10**6)})
        if self.prompt_mode == "opening" and self.query_min_tokens > self.query_max_tokens:
            raise ConfigError(f"data.query_min_tokens ({self.query_min_tokens}) exceeds data.query_max_tokens "
                              f"({self.query_max_tokens})")
        if self.prompt_mode not in PROMPT_MODES:
            raise ConfigError(f"data.prompt_mode '{self.prompt_mode}' must be one of {', '.join(PROMPT_MODES)}")

    @property
    def min_chars(self) -> int:
        """min_review_chars with -1 resolved for the prompt mode."""
        if self.min_review_chars >= 0:
            return self.min_review_chars
        return 200 if self.prompt_mode == "opening" else 0


@dataclass
class PPOConfig:
    learning_rate: float = 1.41e-5
    """Adam learning rate (torch defaults otherwise; no weight decay, no grad clipping)"""
    batch_size: int = 128
    """rollouts per PPO step"""
    mini_batch_size: int = 128
    """rollouts per gradient step; must divide batch_size"""
    micro_batch_size: int = 0
    """rollouts per forward/backward pass on a learner rank: each rank's share of a minibatch runs in
    micro-batches whose gradients accumulate before Adam's step (the same step up to float summation
    order, for less activation memory); must divide mini_batch_size. 0: the whole share at once"""
    gradient_checkpointing: bool = False
    """recompute the policy's layer activations in backward instead of keeping them (transformers'
    gradient checkpointing, non-reentrant): less learner memory for one more forward pass per update"""
    lora_rank: int = 0
    """LoRA adapters of this rank through PEFT instead of training every policy weight (0: full weights).
    The reference model is then the policy with its adapters switched off, the value head trains as
    usual, and rollout actors receive only the adapters"""
    lora_alpha: float = 16.0
    """LoRA scaling numerator: each adapter's update is scaled by lora_alpha / lora_rank"""
    lora_target_modules: str = ""
    """comma-separated names of the modules that get adapters (GPT-2: c_attn,c_proj,c_fc); empty: PEFT's
    default for the architecture (GPT-2: c_attn)"""
    ppo_epochs: int = 4
    """passes over each batch"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value clip around the old values"""
    vf_coef: float = 0.1
    """value loss weight"""
    ratio_threshold: float = 10.0
    """a minibatch whose mean ratio exceeds this has its loss zeroed"""
    kl_penalty: str = "kl"
    """per-token KL estimate; only 'kl' (logp - logp_ref) is defined by the reference"""
    adap_kl_ctrl: bool = True
    """adaptive KL coefficient (Ziegler et al.); false keeps init_kl_coef fixed"""
    init_kl_coef: float = 0.2
    """initial KL coefficient beta"""
    target: float = 6.0
    """adaptive controller's target KL"""
    horizon: float = 10000.0
    """adaptive controller's horizon"""
    max_lag: int = 0
    """0: every batch is generated by the current weights (the reference). 1: the next batch is
    generated while the learner updates, by weights one update old; the behaviour policy's
    log-probs are then the old log-probs of the PPO ratio. Pays only when rollout actors have
    their own GPUs or nodes; no faster where they share the learner's cores (README: "When
    ppo.max_lag=1 pays")"""
    bf16: bool = False
    """bf16 autocast in the learner's forward passes (log-probs, losses and Adam stay fp32); see
    BENCHMARKS.md for where it helps"""
    length_buckets: int = 4
    """the learner runs each forward pass on this many groups of rows of similar length, each padded
    only to its own longest row (1: one batch padded to the longest row, as the reference)"""

    def __post_init__(self) -> None:
        check_ranges("ppo", self, {
            "learning_rate": POSITIVE, "batch_size": above_zero_at_most(10**6), "mini_batch_size": POSITIVE,
            "ppo_epochs": above_zero_at_most(1000), "gamma": UNIT, "lam": UNIT, "cliprange": POSITIVE,
            "cliprange_value": POSITIVE, "vf_coef": NON_NEGATIVE, "ratio_threshold": POSITIVE,
            "init_kl_coef": NON_NEGATIVE, "target": POSITIVE, "horizon": POSITIVE,
            "length_buckets": above_zero_at_most(1024)})
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"ppo.batch_size ({self.batch_size}) must be a multiple of ppo.mini_batch_size "
                              f"({self.mini_batch_size})")
        if self.micro_batch_size < 0 or (self.micro_batch_size and self.mini_batch_size % self.micro_batch_size):
            raise ConfigError(f"ppo.micro_batch_size ({self.micro_batch_size}) must divide ppo.mini_batch_size "
                              f"({self.mini_batch_size}), or be 0 for whole minibatches")
        if self.lora_rank < 0 or self.lora_alpha <= 0:
            raise ConfigError(f"ppo.lora_rank ({self.lora_rank}) must be >= 0 (0: full weights) and ppo.lora_alpha "
                              f"({self.lora_alpha}) > 0")
        if self.kl_penalty != "kl":
            raise ConfigError(f"ppo.kl_penalty '{self.kl_penalty}' is not supported: only 'kl' (logp - logp_ref) "
                              "is defined by the reference step")
        if self.max_lag not in (0, 1):
            raise ConfigError(f"ppo.max_lag ({self.max_lag}) must be 0 or 1")


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster to join ('auto', host:port); empty: RAY_ADDRESS if set, else start Ray on this machine"""
    num_rollout_workers: int = 2
    """rollout actors; each generates a fixed shard of every batch"""
    num_reward_workers: int = 1
    """reward actor replicas; rollout actor i sends to replica i % n"""
    rollout_gpus: float = -1.0
    """GPUs per rollout actor (-1: placed to fit the cluster, see learner_gpus)"""
    reward_gpus: float = -1.0
    """GPUs per reward actor (-1: placed to fit the cluster, see learner_gpus)"""
    learner_gpus: float = -1.0
    """GPUs for the learner actor. -1 fits the cluster: no GPU, every role on CPU; one node with one GPU,
    every role gets a share of it; one node with several, the learner gets one and the rest are shared out
    among rollout and reward actors; several nodes with GPUs, one GPU per role. A value >= 0 wins"""
    learner_cpus: float = 1.0
    """CPUs reserved for the learner actor (it does the heavy CPU work when there is no GPU)"""
    learner_processes: int = 1
    """data-parallel ranks of the learner, each a Ray actor in its own bundle (learner_cpus and
    learner_gpus each) in one torch DDP group (gloo on CPU, NCCL on GPU): each steps on its share of
    every minibatch's rows, DDP averages the gradients; the same step as one rank. On GPU give each rank
    a GPU of its own. On CPU, small models keep more cores busy this way (BENCHMARKS.md)"""
    torch_threads: int = 0
    """torch threads per actor (0: the learner and the reward actors use every core of their node, as they
    compute one at a time; rollout actors, which generate at the same time, cores / num_rollout_workers)"""
    placement_strategy: str = "PACK"
    """Ray placement group strategy: PACK (fewest nodes), SPREAD (rollout actors across nodes), STRICT_*"""
    placement_timeout_s: float = 300.0
    """how long to wait for the resources (long enough for an autoscaler to add nodes)"""
    call_timeout_s: float = 600.0
    """longest wait for any one remote call before the run stops with an error"""
    max_failures: int = 3
    """actor deaths the run survives (each actor counted once per death, however many calls it
    failed): rollout and reward actors are restarted by Ray, the learner by the driver from the
    newest good checkpoint, and their work redone"""

    def __post_init__(self) -> None:
        check_ranges("cluster", self, {
            "num_rollout_workers": above_zero_at_most(1024), "num_reward_workers": above_zero_at_most(1024),
            "rollout_gpus": GPUS, "reward_gpus": GPUS, "learner_gpus": GPUS, "learner_cpus": between(0, 4096),
            "learner_processes": above_zero_at_most(256), "torch_threads": between(0, 1024),
            "placement_timeout_s": above_zero_at_most(WEEK_S), "call_timeout_s": above_zero_at_most(WEEK_S),
            "max_failures": between(0, 1000)})
        if self.address and not ADDRESS.match(self.address) or self.address.rsplit(":", 1)[-1].isdigit() and \
                int(self.address.rsplit(":", 1)[-1]) > 65535:
            raise ConfigError(f"cluster.address '{self.address}' is not a Ray address: pass auto, host:port or "
                              "ray://host:port, or leave it empty to start Ray on this machine")
        if self.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"cluster.placement_strategy '{self.placement_strategy}' must be one of PACK, SPREAD, "
                              "STRICT_PACK, STRICT_SPREAD")


@dataclass
class RunConfig:
    seed: int = 0
    """seeds data order, query lengths, sampling (per step and shard) and the value head init"""
    steps: int = 0
    """PPO steps (0: one pass over the data, 194 with the recipe's data and batch)"""
    out_dir: str = "runs"
    """where run directories are created"""
    name: str = ""
    """run directory name (empty: a timestamp)"""
    checkpoint_every: int = 10
    """write a checkpoint every N steps (0: only at the end)"""
    keep_checkpoints: int = 3
    """how many of the newest checkpoints to keep"""
    resume: str = ""
    """a run directory or checkpoint to continue; its config.yaml is the base, flags still win"""
    report_queries: int = 16
    """held-out queries in the before/after table made at the end (0: no figure or table)"""
    trackers: str = "jsonl"
    """where each step's statistics go, comma-separated: jsonl (always), tensorboard, wandb"""
    eval_every: int = 0
    """score the fixed held-out prompts (data.eval_split, data.eval_prompts) with the weights after steps
    0, N, 2N, ... and log eval/reward_mean in that step's statistics (0: never)"""

    def __post_init__(self) -> None:
        check_ranges("run", self, {"seed": between(0, 2**32 - 1), "steps": between(0, 10**7),
                                   "checkpoint_every": NON_NEGATIVE, "keep_checkpoints": above_zero_at_most(1000),
                                   "report_queries": between(0, 10_000), "eval_every": NON_NEGATIVE})
        if self.name and (self.name in (".", "..") or any(c in self.name for c in "/\\\0")):
            raise ConfigError(f"run.name '{self.name}' must be a plain folder name inside run.out_dir "
                              "(no '/', not '.' or '..')")


def _actor_checks(section: str, settings: Any, actor_cls: type) -> None:
    """The actor dataclass's own checks (its ``__post_init__``, if any), naming the section."""
    check = getattr(actor_cls, "__post_init__", None)
    if check is not None:
        try:
            check(settings)
        except ValueError as err:
            raise ConfigError(f"{section}: {err}") from None


@dataclass
class RolloutSection(RolloutSettings):
    """The rollout actors' own settings (actors.rollout.RolloutSettings); the driver sets their seed and threads."""

    seed: tyro.conf.Suppress[int] = 0
    torch_threads: tyro.conf.Suppress[int] = 1

    def __post_init__(self) -> None:
        _actor_checks("rollout", self, RolloutSettings)
        check_ranges("rollout", self, {"response_max_tokens": above_zero_at_most(4096),
                                       "top_k": between(0, 10**7)})
        if not DEVICE.match(self.device):
            raise ConfigError(f"rollout.device '{self.device}' is not a device: pass auto, cpu, cuda or cuda:N")

    def for_actor(self, seed: int, torch_threads: int) -> RolloutSettings:
        """The plain actor-side dataclass: actors never unpickle a learner type."""
        return RolloutSettings(**{**dataclasses.asdict(self), "seed": seed, "torch_threads": torch_threads})


@dataclass
class RewardSection(RewardSettings):
    """The reward actors' own settings (rewards.scorer.RewardSettings); the driver sets their threads."""

    torch_threads: tyro.conf.Suppress[int] = 1
    sources: tyro.conf.Suppress[list[SourceSpec]] = field(default_factory=list)
    """a weighted mix, YAML only (reward.sources): a list of {name, weight, and one of model / function / url}"""

    def __post_init__(self) -> None:
        try:
            RewardSettings.__post_init__(self)
        except ValueError as err:  # named by its dotted path where the message starts with a field
            message = str(err)
            field_name = message.split(" ", 1)[0].rstrip(":")
            if message.startswith("reward."):
                raise ConfigError(message) from None
            known = field_name in {f.name for f in dataclasses.fields(RewardSettings)}
            raise ConfigError(f"reward.{message}" if known else f"reward: {message}") from None

    def for_actor(self, torch_threads: int) -> RewardSettings:
        return RewardSettings(**{**dataclasses.asdict(self), "torch_threads": torch_threads})


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def policy(self) -> str:
        """The policy being tuned: the learner and every rollout actor load this one."""
        return self.rollout.policy

    def validate(self) -> "Config":
        """Check every setting once; raise ConfigError naming the first one that cannot work.

        Each section is rebuilt through its own dataclass, so its checks (``__post_init__``) run
        however its values were set; then every number must be finite; then the checks that
        span sections."""
        for section in dataclasses.fields(self):
            setattr(self, section.name, dataclasses.replace(getattr(self, section.name)))
        for name, (typ, _) in leaves(hidden=True).items():
            value = get_path(self, name)
            if typ is float and not math.isfinite(value):
                raise ConfigError(f"{name} ({value}) must be a finite number")
        p, c = self.ppo, self.cluster
        if c.learner_processes > p.mini_batch_size:
            raise ConfigError(f"cluster.learner_processes ({c.learner_processes}) exceeds ppo.mini_batch_size "
                              f"({p.mini_batch_size}): each learner rank needs at least one row of every minibatch")
        if c.num_rollout_workers > p.batch_size:
            raise ConfigError(f"cluster.num_rollout_workers ({c.num_rollout_workers}) exceeds ppo.batch_size "
                              f"({p.batch_size}): each rollout actor needs at least one query per step")
        if self.run.eval_every and self.data.eval_prompts < c.num_rollout_workers:
            raise ConfigError(f"data.eval_prompts ({self.data.eval_prompts}) is fewer than cluster.num_rollout_workers "
                              f"({c.num_rollout_workers}): each rollout actor needs at least one prompt to score")
        for name in ("rollout.policy", "reward.model", "data.dataset"):
            _check_local(name, get_path(self, name))
        r = self.reward
        tries = (r.retries + 1) * r.timeout_s
        if any(spec.url for spec in r.source_specs()) and tries >= c.call_timeout_s:
            raise ConfigError(f"reward.timeout_s ({r.timeout_s:g}) x (reward.retries ({r.retries}) + 1) = {tries:g}s "
                              f"must stay below cluster.call_timeout_s ({c.call_timeout_s:g}), so that a reward "
                              "endpoint that is down is reported as such")
        for spec in self.reward.sources:
            if spec.model:
                _check_local(f"reward.sources '{spec.name}': model", spec.model)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_local(name: str, value: str) -> None:
    named_file = name == "data.dataset" and Path(value).suffix.lower() in DATA_FILE_KINDS  # not a hub id
    if (looks_local(value) or named_file) and not Path(value).expanduser().exists():
        raise ConfigError(f"{name}: '{value}' does not exist; pass an existing local folder or a hub id")
    path = Path(value).expanduser()
    if name == "data.dataset" and path.is_file() and path.suffix.lower() not in DATA_FILE_KINDS:
        raise ConfigError(f"data.dataset: '{value}' is not a .jsonl, .csv or .parquet file; pass one of those, a "
                          "folder of <split>.parquet files or a hub dataset")


def is_data_file(value: str) -> bool:
    """Whether a dataset or split names one local data file (by its suffix)."""
    return Path(value).suffix.lower() in DATA_FILE_KINDS and Path(value).expanduser().is_file()


def resolve_local_paths(cfg: Config) -> Config:
    """Make local model and data paths absolute: ``ray job submit`` runs the driver in a
    copied working directory, and actors on other nodes have another one."""
    for name in ("rollout.policy", "reward.model", "data.dataset", "data.split", "data.eval_split", "run.out_dir"):
        value = get_path(cfg, name)
        if name.endswith("split") and not is_data_file(value):
            continue
        if name == "run.out_dir" or looks_local(value):
            set_path(cfg, name, str(Path(value).expanduser().resolve()))
    for spec in cfg.reward.sources:
        if spec.model and looks_local(spec.model):
            spec.model = str(Path(spec.model).expanduser().resolve())
    return cfg


# ----------------------------------------------------------------------------- command line

# Short names for what everybody sets; each stands for one dotted setting.
ALIASES = {
    "policy": "rollout.policy",
    "reward-model": "reward.model",
    "dataset": "data.dataset",
    "steps": "run.steps",
    "seed": "run.seed",
    "address": "cluster.address",
    "num-rollout-workers": "cluster.num_rollout_workers",
    "out-dir": "run.out_dir",
    "learning-rate": "ppo.learning_rate",
    "batch-size": "ppo.batch_size",
    "resume": "run.resume",
}

# Settings a YAML file may hold that have no flag: a list of sections does not fit one.
YAML_ONLY = ("reward.sources",)

# What a resumed run cannot change: the models, the data stream and the batch shape fix what
# the checkpoint holds (weights, Adam's moments, the data position, the sampling seeds).
FROZEN_ON_RESUME = ("rollout.policy", "reward.model", "reward.positive_label", "reward.function", "reward.url",
                    "reward.sources", "data.dataset", "data.split",
                    "data.text_column", "data.prompt_mode", "data.chat_template", "data.min_review_chars",
                    "data.query_min_tokens", "data.query_max_tokens",
                    "ppo.batch_size", "ppo.mini_batch_size", "ppo.max_lag", "run.seed", "cluster.num_rollout_workers",
                    "ppo.lora_rank", "ppo.lora_target_modules")


@dataclass
class CommandLine:
    """PPO fine-tuning of GPT-2 on IMDB with a sentiment reward, on Ray.

    Every setting is a flag named by its place in the config tree (- and _ alike).

    A YAML file (--config FILE) may hold any of them, nested the same way; flags win over it.
    It may also hold reward.sources, a weighted mix of rewards (README: Rewards).

    With --resume RUN_DIR the run's saved config is the base; flags still win.

    Short aliases: --policy, --reward-model, --dataset, --steps, --seed, --address, --resume,
    --out-dir, --num-rollout-workers, --learning-rate, --batch-size."""

    config: str = ""
    """YAML file of settings, nested like the flags; flags win over it"""
    settings: Annotated[Config, tyro.conf.arg(name="")] = field(default_factory=Config)


def parse_args(argv: Sequence[str] | None = None, prog: str = "python -m learner.main") -> Config:
    """Defaults <- a resumed run's saved config <- the YAML file <- flags, validated.

    tyro builds the command line (and ``--help``) from the dataclasses, each flag's help being
    its field's docstring; every error it or the checks find is one ConfigError line.
    """
    args = [_expand_alias(a) for a in (sys.argv[1:] if argv is None else argv)]
    config_file = _flag_value(args, "config")
    settings = _file_settings(config_file) if config_file else {}
    # run.resume means the same in a YAML file as on the command line: one resume path.
    resume = _flag_value(args, "run.resume") or settings.get("run.resume")
    resumed = _resumable(str(resume)) if resume else None
    saved = _resumed_settings(resumed[0] / "config.yaml") if resumed else {}
    base = {**saved, **settings}
    default = CommandLine(config_file or "", from_overrides(base, validate=False))
    cli, unknown = _tyro(args, default, prog)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise _unknown(flag.lstrip("-").split("=")[0].replace("-", "_"), list(leaves()) + list(ALIASES))
    cfg = cli.settings
    if resumed:
        given = {name for name in ("run.out_dir", "run.name") if _flag_value(args, name) is not None or name in settings}
        _check_resumable_changes(cfg, saved, *resumed, given)
    return cfg.validate()


def _tyro(args: list[str], default: CommandLine, prog: str) -> tuple[CommandLine, list[str]]:
    """tyro's parse of ``args`` over ``default``, and the flags it does not know. ``--help``
    prints and exits 0. Otherwise tyro prints nothing (console output off) and a refused value
    raises its ConfigError line from tyro's parse-error hook (``_refused``)."""
    helping = any(a in ("-h", "--help") for a in args)
    try:
        with on_parse_error(_refused):
            return tyro.cli(CommandLine, args=args, default=default, prog=prog, use_underscores=True,
                            return_unknown_args=True, console_outputs=helping,
                            config=(tyro.conf.FlagConversionOff,))
    except SystemExit as exit_:
        if exit_.code in (0, None):
            raise
        raise ConfigError(f"bad command line (see {prog} --help)") from None  # refused, the hook absent


def _refused(event: Any) -> None:
    """tyro's parse error as one ConfigError line: the flag, then why tyro refused its value."""
    from tyro import _errors

    arg = getattr(event, "argument", None)
    where = f"argument {'/'.join(arg.lowered.name_or_flags)}: " if arg is not None else ""
    see = f" (see {event.prog} --help)"
    if isinstance(event, _errors.InstantiationFailure):  # a value tyro could not convert, or a section's check
        raise ConfigError(where + event.message + (see if where else ""))
    if isinstance(event, _errors.InvalidChoice):
        raise ConfigError(f"{where}invalid choice {event.value!r} (choose from {', '.join(event.choices)}){see}")
    if isinstance(event, _errors.BadValue) and event.reason == "too_few_values":
        raise ConfigError(f"{where}expected one argument{see}")
    raise ConfigError(f"{where}refused ({type(event).__name__}){see}")


def _expand_alias(arg: str) -> str:
    key, sep, value = arg.partition("=")
    name = ALIASES.get(key[2:]) if key.startswith("--") else None
    return f"--{name}{sep}{value}" if name else arg


def _flag_value(args: list[str], name: str) -> str | None:
    """The value given to --name (either spelling of its underscores), last one winning."""
    found = None
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(args):
        key, sep, value = arg.partition("=")
        if key in spellings:
            found = value if sep else (args[i + 1] if i + 1 < len(args) else None)
    return found


def leaves(cls: type = Config, prefix: str = "", hidden: bool = False) -> dict[str, tuple[type, Any]]:
    """Every setting the command line offers: dotted name -> (type, default). ``hidden=True``
    adds those the driver sets itself (``tyro.conf.Suppress``), which saved configs hold too."""
    out: dict[str, tuple[type, Any]] = {}
    hints, marked = typing.get_type_hints(cls), typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        name, typ = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(leaves(typ, name + ".", hidden))
        elif hidden or tyro.conf.Suppress not in typing.get_args(marked[f.name])[1:]:
            out[name] = (typ, f.default if f.default is not dataclasses.MISSING else f.default_factory())
    return out


def get_path(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def set_path(cfg: Any, dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    setattr(cfg, last, value)


def _coerce(name: str, typ: Any, value: Any) -> Any:
    """A YAML value as the field's type, or a ConfigError naming the setting."""
    if name == "reward.sources":
        return _sources(value)
    try:
        if typ is bool and isinstance(value, bool) or typ is str and isinstance(value, str):
            return value
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is float and isinstance(value, str):  # YAML reads 3e-4 (no dot) as a string
            return float(value)
    except ValueError:
        pass
    raise ConfigError(f"{name}: {value!r} is not a valid {getattr(typ, '__name__', typ)}")


def _sources(value: Any) -> list[SourceSpec]:
    """reward.sources from YAML: a list of {name, weight, one of model / function / url}."""
    if not isinstance(value, list):  # [] is no mix: a saved run's config.yaml holds it so
        raise ConfigError("reward.sources must be a list of {name, weight, and one of model, function, url}")
    keys = [f.name for f in dataclasses.fields(SourceSpec)]
    out = []
    for i, item in enumerate(value):
        if isinstance(item, SourceSpec):
            out.append(item)
            continue
        if not isinstance(item, dict):
            raise ConfigError(f"reward.sources[{i}] must be a mapping of {', '.join(keys)} (got {item!r:.60})")
        unknown = [k for k in item if k not in keys]
        if unknown:
            raise ConfigError(f"reward.sources[{i}]: unknown key '{unknown[0]}' (keys: {', '.join(keys)})")
        fields = {k: _coerce(f"reward.sources[{i}].{k}", float if k == "weight" else str, v) for k, v in item.items()}
        try:
            out.append(SourceSpec(**fields))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return out


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the settings"
    return ConfigError(f"unknown setting '{name}'{hint}")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and name not in YAML_ONLY:  # reward.sources is a list, however written
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


class _SettingsLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses what a settings file never needs and a hostile one uses:
    an alias of a mapping or list (it may refer to itself, or multiply into an exponential
    tree once flattened) and a key given twice in one mapping (YAML keeps the last silently)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            node = self.anchors.get(event.anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise ConfigError(f"uses the alias *{event.anchor} of a mapping or list (line {event.start_mark.line + 1}); "
                                  "write the settings out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # the base class refuses an unhashable key in its own words
            if key in seen:
                raise ConfigError(f"holds the key '{key}' twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """A settings file as {dotted name: value}; ConfigError if it is missing, not UTF-8, not
    valid YAML, not a mapping, or uses what ``_SettingsLoader`` refuses."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what}: '{path}' does not exist")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{what}: '{path}' is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"{what}: '{path}' cannot be read ({err.strerror})") from None
    try:
        tree = yaml.load(text, Loader=_SettingsLoader) or {}
    except ConfigError as err:
        raise ConfigError(f"{what}: '{path}' {err}") from None
    except (yaml.YAMLError, RecursionError) as err:
        raise ConfigError(f"{what}: '{path}' is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{what}: '{path}' must hold a mapping of sections")
    return _flatten(tree)


def saved_settings(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """A run directory's config.yaml as overrides. Settings this version does not know (a run
    of another version) are dropped with a warning rather than refusing the whole run."""
    known = leaves(hidden=True)
    out = {}
    for name, value in load_yaml(path, what).items():
        if name in known:
            out[name] = value
        else:
            log.warning("%s: unknown setting '%s' ignored", path, name)
    return out


def _resumed_settings(path: Path) -> dict[str, Any]:
    """The resumed run's config.yaml, whole: one that lacks settings (truncated, edited) is
    refused, as the defaults would silently replace them."""
    saved = saved_settings(path, "--resume")
    missing = [name for name in leaves(hidden=True) if name not in saved]
    if missing:
        raise ConfigError(f"--resume: {path} lacks {len(missing)} setting(s) ({missing[0]}, ...): it is truncated or "
                          "edited; restore it or start a new run")
    return saved


def _file_settings(config_file: str) -> dict[str, Any]:
    """The YAML file's settings; a name the command line does not offer is refused (what the
    driver sets itself is no more a YAML setting than a flag)."""
    settings = load_yaml(config_file)
    offered = leaves()
    for name in settings:
        if name not in offered and name not in YAML_ONLY:
            raise _unknown(name, list(offered))
    return settings


def _resumable(path: str) -> tuple[Path, dict[str, Any]]:
    """(run directory, the manifest of its newest usable checkpoint) for ``run.resume``."""
    from learner.records.checkpoint import find_resumable, manifest  # here: the records import this module

    run_dir, ckpt, _ = find_resumable(Path(path))
    return run_dir, manifest(ckpt)


def _check_resumable_changes(cfg: Config, saved: dict[str, Any], run_dir: Path, manifest: dict[str, Any],
                             given: set[str]) -> None:
    """A resumed run continues in its own directory, no further back than its checkpoint, and
    what the checkpoint fixes cannot change: neither by a flag or a YAML file given now, nor by
    an edited config.yaml (the checkpoint's manifest records those settings as they were)."""
    table = leaves(hidden=True)
    fixed = manifest.get("invariants") or saved  # a checkpoint written before manifests held them: config.yaml
    for name in FROZEN_ON_RESUME:
        if name not in fixed:
            raise ConfigError(f"--resume: the checkpoint of {run_dir} does not record {name}; its config.yaml or "
                              "manifest is damaged: start a new run instead")
        if get_path(cfg, name) != _coerce(name, table[name][0], fixed[name]):
            raise ConfigError(f"{name} cannot change on --resume (the run has {fixed[name]!r}, asked "
                              f"{get_path(cfg, name)!r}); start a new run instead")
    for name, want in (("run.out_dir", run_dir.parent), ("run.name", run_dir.name)):
        value = get_path(cfg, name)
        if name in given and (Path(value).expanduser().resolve() if name == "run.out_dir" else value) != want:
            raise ConfigError(f"{name} cannot be given with --resume: the run continues in {run_dir}; leave "
                              f"{name} out, or start a new run without --resume")
    done = manifest["step"]
    if 0 < cfg.run.steps < done:
        raise ConfigError(f"run.steps ({cfg.run.steps}) is below the {done} steps the checkpoint has done; pass "
                          f"--run.steps {done} or more")
    set_path(cfg, "run.out_dir", str(run_dir.parent))
    set_path(cfg, "run.name", run_dir.name)
    set_path(cfg, "run.resume", str(run_dir))


def from_overrides(overrides: dict[str, Any], validate: bool = True) -> Config:
    """A Config from the defaults and {dotted name: value} overrides (YAML or a saved run)."""
    cfg = Config()
    table = leaves(hidden=True)
    for name, value in overrides.items():
        if name not in table:
            raise _unknown(name, list(table))
        set_path(cfg, name, _coerce(name, table[name][0], value))
    return cfg.validate() if validate else cfg
