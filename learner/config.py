"""One tree of dataclasses holding every setting; the reference recipe is the default.

Sources, later ones winning: the defaults below (``shared/docs/seed.md``), an optional
YAML file (``--config file.yaml``, nested like the tree), then CLI flags named by their
dotted path (``--ppo.learning_rate 3e-4``; ``-`` and ``_`` are interchangeable). A few
short aliases exist for what everybody sets (``--policy``, ``--reward-model``,
``--dataset``, ``--steps``, ``--seed``). The result is validated once, at start-up.

The rollout and reward sections are the actors' own dataclasses: each actor receives
only its section.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from actors.rollout import RolloutSettings
from rewards.scorer import RewardSettings


class ConfigError(ValueError):
    """A setting that cannot work; the message names it and says how to fix it."""


@dataclass
class DataConfig:
    dataset: str = "stanfordnlp/imdb"
    """hub dataset name, or a local folder of parquet files named <split>.parquet"""
    split: str = "train"
    """which split gives the training prompts"""
    text_column: str = "text"
    """the column holding the review text"""
    min_review_chars: int = 200
    """reviews this long or shorter are dropped (the recipe keeps 24,895 of 25,000)"""
    query_min_tokens: int = 2
    """a query is the first k policy tokens of a review, k uniform in [min, max], drawn once per review"""
    query_max_tokens: int = 7
    """see query_min_tokens"""


@dataclass
class PPOConfig:
    learning_rate: float = 1.41e-5
    """Adam learning rate (torch defaults otherwise; no weight decay, no grad clipping)"""
    batch_size: int = 128
    """rollouts per PPO step"""
    mini_batch_size: int = 128
    """rollouts per gradient step; must divide batch_size"""
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
    forward_batch_size: int = 0
    """rows per no-grad forward pass in the learner (0: mini_batch_size); lowers peak memory only"""


@dataclass
class ClusterConfig:
    address: str = ""
    """Ray cluster to join ('auto', host:port); empty: RAY_ADDRESS if set, else start Ray on this machine"""
    num_rollout_workers: int = 2
    """rollout actors; each generates a fixed shard of every batch"""
    num_reward_workers: int = 1
    """reward actor replicas; rollout actor i sends to replica i % n"""
    rollout_gpus: float = -1.0
    """GPUs per rollout actor (-1: 1 if the cluster has GPUs, else 0)"""
    reward_gpus: float = -1.0
    """GPUs per reward actor (-1: 1 if the cluster has GPUs, else 0)"""
    learner_gpus: float = -1.0
    """GPUs for the learner actor (-1: 1 if the cluster has GPUs, else 0)"""
    learner_cpus: float = 1.0
    """CPUs reserved for the learner actor (it does the heavy CPU work when there is no GPU)"""
    torch_threads: int = 0
    """torch threads per actor (0: the learner uses all cores, rollout and reward actors cores / num_rollout_workers)"""
    placement_strategy: str = "PACK"
    """Ray placement group strategy: PACK (fewest nodes), SPREAD (rollout actors across nodes), STRICT_*"""
    placement_timeout_s: float = 300.0
    """how long to wait for the resources (long enough for an autoscaler to add nodes)"""
    call_timeout_s: float = 600.0
    """longest wait for any one remote call before the run stops with an error"""
    max_failures: int = 3
    """rollout/reward actor failures (restarted by Ray, their work redone) before the run stops"""


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
    test_nan_reward_step: int = -1
    """TEST ONLY: make one reward NaN at this step, to exercise the non-finite stop"""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutSettings = field(default_factory=RolloutSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def policy(self) -> str:
        """The policy being tuned: the learner and every rollout actor load this one."""
        return self.rollout.policy

    def validate(self) -> "Config":
        """Check every setting once; raise ConfigError naming the first one that cannot work."""
        p, d, r, c = self.ppo, self.data, self.rollout, self.cluster
        _positive(self, ["ppo.batch_size", "ppo.mini_batch_size", "ppo.ppo_epochs", "ppo.learning_rate",
                         "data.query_min_tokens", "rollout.response_min_tokens", "cluster.num_rollout_workers",
                         "cluster.num_reward_workers", "cluster.placement_timeout_s", "cluster.call_timeout_s",
                         "reward.max_batch_size"])
        if p.batch_size % p.mini_batch_size:
            raise ConfigError(f"ppo.batch_size ({p.batch_size}) must be a multiple of ppo.mini_batch_size "
                              f"({p.mini_batch_size})")
        if p.mini_batch_size > p.batch_size:
            raise ConfigError(f"ppo.mini_batch_size ({p.mini_batch_size}) exceeds ppo.batch_size ({p.batch_size})")
        if c.num_rollout_workers > p.batch_size:
            raise ConfigError(f"cluster.num_rollout_workers ({c.num_rollout_workers}) exceeds ppo.batch_size "
                              f"({p.batch_size}): each rollout actor needs at least one query per step")
        if d.query_min_tokens > d.query_max_tokens:
            raise ConfigError(f"data.query_min_tokens ({d.query_min_tokens}) exceeds data.query_max_tokens "
                              f"({d.query_max_tokens})")
        if r.response_min_tokens > r.response_max_tokens:
            raise ConfigError(f"rollout.response_min_tokens ({r.response_min_tokens}) exceeds "
                              f"rollout.response_max_tokens ({r.response_max_tokens})")
        if p.kl_penalty != "kl":
            raise ConfigError(f"ppo.kl_penalty '{p.kl_penalty}' is not supported: only 'kl' (logp - logp_ref) "
                              "is defined by the reference step")
        if not 0 <= p.lam <= 1 or not 0 <= p.gamma <= 1:
            raise ConfigError("ppo.gamma and ppo.lam must lie in [0, 1]")
        if c.placement_strategy not in ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"):
            raise ConfigError(f"cluster.placement_strategy '{c.placement_strategy}' must be one of PACK, SPREAD, "
                              "STRICT_PACK, STRICT_SPREAD")
        if self.run.steps < 0:
            raise ConfigError(f"run.steps ({self.run.steps}) must be >= 0 (0: one pass over the data)")
        for name in ("rollout.policy", "reward.model", "data.dataset"):
            _check_local(name, get_path(self, name))
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _positive(cfg: Config, names: list[str]) -> None:
    for name in names:
        if get_path(cfg, name) <= 0:
            raise ConfigError(f"{name} ({get_path(cfg, name)}) must be positive")


def _looks_local(value: str) -> bool:
    # Hub ids are 'name' or 'org/name'; anything else is a path the user meant.
    return value.startswith((".", "/", "~")) or value.count("/") > 1 or os.path.exists(value)


def _check_local(name: str, value: str) -> None:
    if _looks_local(value) and not Path(value).expanduser().exists():
        raise ConfigError(f"{name}: '{value}' does not exist; pass an existing local folder or a hub id")


def resolve_local_paths(cfg: Config) -> Config:
    """Make local model and data paths absolute: ``ray job submit`` runs the driver in a
    copied working directory, and actors on other nodes have another one."""
    for name in ("rollout.policy", "reward.model", "data.dataset", "run.out_dir"):
        value = get_path(cfg, name)
        if name == "run.out_dir" or _looks_local(value):
            set_path(cfg, name, str(Path(value).expanduser().resolve()))
    return cfg


# ----------------------------------------------------------------------------- parsing

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

# Set by the driver, not by users: the rollout seed is the run's seed.
HIDDEN = {"rollout.seed"}


def leaves(cls: type = Config, prefix: str = "") -> dict[str, tuple[type, Any, str]]:
    """Every leaf setting: dotted name -> (type, default, help)."""
    out: dict[str, tuple[type, Any, str]] = {}
    hints = typing.get_type_hints(cls)
    docs = _field_docs(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            out.update(leaves(typ, name + "."))
        elif name not in HIDDEN:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out[name] = (typ, default, docs.get(f.name, ""))
    return out


def _field_docs(cls: type) -> dict[str, str]:
    """Docstrings under fields (cleanrl style), or trailing comments, become --help."""
    import inspect

    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    for i, line in enumerate(lines):
        stripped = line.strip()
        if ":" not in stripped or stripped.startswith(("#", '"', "def ", "class ", "@")):
            continue
        fname = stripped.split(":", 1)[0].strip()
        if not fname.isidentifier():
            continue
        if "#" in stripped:
            docs[fname] = stripped.split("#", 1)[1].strip()
        if i + 1 < len(lines) and lines[i + 1].strip().startswith('"""'):
            docs[fname] = lines[i + 1].strip().strip('"').strip()
    return docs


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
    """A YAML or CLI value as the field's type, or a ConfigError naming the setting."""
    base = typ
    if typing.get_origin(typ) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value is None:
            return None
        base = args[0]
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if base is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if base is float:
            return float(value)
        if base is str:
            return str(value)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"{name}: '{value}' is not a valid {getattr(base, '__name__', base)}")


def _unknown(name: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the settings"
    return ConfigError(f"unknown setting '{name}'{hint}")


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: '{path}' does not exist")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config: '{path}' is not valid YAML ({str(err).splitlines()[0]})") from err
    if not isinstance(tree, dict):
        raise ConfigError(f"--config: '{path}' must hold a mapping of sections")
    return _flatten(tree)


def build_parser(extra: typing.Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m learner.main", allow_abbrev=False,
        description="PPO fine-tuning of GPT-2 on IMDB with a sentiment reward, on Ray.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", help="YAML file with settings (nested like the flags); flags win over it")
    if extra:
        extra(parser)
    alias_of = {v: k for k, v in ALIASES.items()}
    for name, (typ, default, doc) in leaves().items():
        flags = [f"--{name}"] + ([f"--{alias_of[name]}"] if name in alias_of else [])
        # Values stay strings here: defaults come from the dataclasses and YAML, and one
        # coercion path (_coerce) gives every bad value the same one-line error.
        parser.add_argument(*flags, dest=name, default=None, metavar=getattr(typ, "__name__", "VALUE").upper(),
                            help=f"{doc} (default: {default})")
    return parser


def _normalise_argv(argv: list[str]) -> list[str]:
    # --ppo.learning-rate and --ppo.learning_rate both work.
    out = []
    for arg in argv:
        if arg.startswith("--") and "." in arg.split("=", 1)[0]:
            key, *rest = arg.split("=", 1)
            arg = key.replace("-", "_").replace("__", "--", 1) + ("=" + rest[0] if rest else "")
        out.append(arg)
    return out


def parse_args(argv: list[str] | None = None,
               extra: typing.Callable[[argparse.ArgumentParser], None] | None = None
               ) -> tuple[Config, argparse.Namespace]:
    """Defaults <- YAML <- flags, validated. Unknown flags and bad values raise ConfigError."""
    parser = build_parser(extra)
    known = list(leaves())
    args, unknown = parser.parse_known_args(_normalise_argv(sys.argv[1:] if argv is None else list(argv)))
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        raise _unknown(flag.lstrip("-").split("=")[0], [f"{k}" for k in known] + list(ALIASES))
    overrides: dict[str, Any] = load_yaml(args.config) if args.config else {}
    for name in known:
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    if overrides.get("run.resume"):
        overrides = resume_overrides(str(overrides["run.resume"]), overrides)
    cfg = from_overrides(overrides)
    return cfg, args


def resume_overrides(path: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The resumed run's saved settings, then this command's flags; same run directory."""
    from learner.checkpoint import find_resumable

    run_dir, _, _ = find_resumable(Path(path))
    saved = {k: v for k, v in load_yaml(run_dir / "config.yaml").items() if k not in HIDDEN}
    merged = {**saved, **overrides}
    merged.update({"run.out_dir": str(run_dir.parent), "run.name": run_dir.name, "run.resume": path})
    return merged


def from_overrides(overrides: dict[str, Any]) -> Config:
    """A validated Config from defaults and dotted-name overrides (YAML or flags)."""
    cfg = Config()
    table = leaves()
    for name, value in overrides.items():
        name = ALIASES.get(name.replace("_", "-"), name)
        if name not in table:
            raise _unknown(name, list(table))
        set_path(cfg, name, _coerce(name, table[name][0], value))
    return cfg.validate()
