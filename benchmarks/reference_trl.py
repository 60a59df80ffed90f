"""The reference trainer on the same work: TRL 0.11.4's legacy ``PPOTrainer`` (gpt2-sentiment).

Runs in its own virtual environment, never in the project's (TRL 0.11.4 needs transformers 4.x):

    bash benchmarks/setup_reference_env.sh            # once: benchmarks/.venv-trl
    HF_HUB_OFFLINE=1 benchmarks/.venv-trl/bin/python benchmarks/reference_trl.py \\
        --config configs/stand-in.yaml --steps 40 --seed 0 --out /tmp/trl.jsonl

It is the notebook's loop with the reference's best settings (docs/recipe.md):

1. queries: IMDB reviews over ``data.min_review_chars`` characters, the first k policy tokens,
   k uniform in [query_min_tokens, query_max_tokens] drawn once per review; a seeded shuffle,
   batches of ``ppo.batch_size`` without the remainder;
2. generate: ALL queries of the step in one ``generate`` call (``PPOTrainer.generate`` with
   ``batch_size`` = the whole batch: left padding, pad = EOS, top_k=0, top_p=1.0, do_sample)
   to the longest of the per-query lengths drawn uniformly from
   [response_min_tokens, response_max_tokens]; each response is then cut after its first EOS
   (EOS kept; TRL's ``remove_padding``) and to its own drawn length;
3. score: the raw ``reward.positive_label`` logit (found by label name) of
   ``decode(query) + decode(response)`` with special tokens skipped, all texts in one padded
   forward pass of the classifier;
4. update: ``PPOTrainer.step`` (its no-grad forward passes, advantages and the PPO epochs).

Settings come from the project's YAML (``--config``, paths relative to the repository root)
on top of the recipe's defaults; ``--ppo.batch_size 32``-style flags override them with the
project's own dotted names. Every step writes one JSON line to ``--out`` (reward mean, the
time of each phase); the last line is a summary (``"summary": true``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

# The recipe's values (docs/recipe.md), under the project's dotted names. Only these
# settings mean something to the reference trainer; others in the YAML are ignored.
DEFAULTS: dict[str, Any] = {
    "rollout.policy": "lvwerra/gpt2-imdb",
    "rollout.response_min_tokens": 4,
    "rollout.response_max_tokens": 15,
    "rollout.top_k": 0,
    "rollout.top_p": 1.0,
    "rollout.temperature": 1.0,
    "reward.model": "lvwerra/distilbert-imdb",
    "reward.positive_label": "POSITIVE",
    "reward.max_length": 512,
    "data.dataset": "stanfordnlp/imdb",
    "data.split": "train",
    "data.text_column": "text",
    "data.min_review_chars": 200,
    "data.query_min_tokens": 2,
    "data.query_max_tokens": 7,
    "ppo.learning_rate": 1.41e-5,
    "ppo.batch_size": 128,
    "ppo.mini_batch_size": 128,
    "ppo.ppo_epochs": 4,
    "ppo.gamma": 1.0,
    "ppo.lam": 0.95,
    "ppo.cliprange": 0.2,
    "ppo.cliprange_value": 0.2,
    "ppo.vf_coef": 0.1,
    "ppo.ratio_threshold": 10.0,
    "ppo.kl_penalty": "kl",
    "ppo.adap_kl_ctrl": True,
    "ppo.init_kl_coef": 0.2,
    "ppo.target": 6.0,
    "ppo.horizon": 10000.0,
    "run.steps": 0,
    "run.seed": 0,
}
PATHS = ("rollout.policy", "reward.model", "data.dataset")


def _cast(name: str, value: Any) -> Any:
    default = DEFAULTS[name]
    if isinstance(default, bool):
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise SystemExit(f"error: {name} must be true or false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        return bool(value)
    return type(default)(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def load_settings(config: str | None, overrides: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Recipe defaults <- the project's YAML <- ``--section.key value`` flags.

    Returns the settings and the YAML keys the reference has no use for (cluster.*, ...).
    """
    import yaml

    settings = dict(DEFAULTS)
    ignored: list[str] = []
    if config:
        path = Path(config)
        path = path if path.is_absolute() else REPO / path
        for name, value in _flatten(yaml.safe_load(path.read_text()) or {}).items():
            if name in DEFAULTS:
                settings[name] = _cast(name, value)
            else:
                ignored.append(name)
    if len(overrides) % 2:
        raise SystemExit(f"error: override flags come in pairs '--section.key value', got {overrides}")
    for flag, value in zip(overrides[::2], overrides[1::2]):
        name = flag.lstrip("-").replace("-", "_")
        if not flag.startswith("--") or name not in DEFAULTS:
            raise SystemExit(f"error: unknown setting {flag!r} for the reference trainer; known: "
                             + ", ".join(sorted(DEFAULTS)))
        settings[name] = _cast(name, value)
    for name in PATHS:  # local paths in the YAML are relative to the repository root
        value = settings[name]
        if value.startswith((".", "/", "~")) or value.count("/") > 1:
            p = Path(value).expanduser()
            settings[name] = str(p if p.is_absolute() else (REPO / p).resolve())
    return settings, ignored


class Prompts:
    """Batches of query token ids as the notebook built them, seeded; see the module docstring."""

    def __init__(self, s: dict[str, Any], tokenizer: Any, seed: int) -> None:
        import numpy as np
        import pyarrow.parquet as pq

        file = Path(s["data.dataset"]) / f"{s['data.split']}.parquet"
        texts = pq.read_table(file, columns=[s["data.text_column"]]).column(0).to_pylist()
        self.texts = [t for t in texts if isinstance(t, str) and len(t) > s["data.min_review_chars"]]
        self.tokenizer = tokenizer
        self.batch_size = s["ppo.batch_size"]
        rng = np.random.default_rng([seed, 7])
        self.k = rng.integers(s["data.query_min_tokens"], s["data.query_max_tokens"] + 1, size=len(self.texts))
        self.seed, self.epoch, self.position = seed, 0, 0
        self.order = np.random.default_rng([seed, 0]).permutation(len(self.texts))

    def next_batch(self) -> list[list[int]]:
        import numpy as np

        if self.position + self.batch_size > len(self.texts):  # drop_last, new shuffled pass
            self.epoch, self.position = self.epoch + 1, 0
            self.order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.texts))
        idx = self.order[self.position:self.position + self.batch_size]
        self.position += self.batch_size
        ks = [int(self.k[i]) for i in idx]
        # Truncating after tokenizing keeps exactly the first k tokens of the whole review.
        ids = self.tokenizer([self.texts[i] for i in idx], truncation=True, max_length=max(ks))["input_ids"]
        return [row[:k] for row, k in zip(ids, ks)]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


@dataclass
class Reference:
    """What every step uses: the TRL trainer and its config, the policy's tokenizer, the reward
    model with the index of its positive label, the prompts and the response-length draws."""

    s: dict[str, Any]
    config: Any
    trainer: Any
    tokenizer: Any
    device: Any
    reward_tok: Any
    reward_model: Any
    positive: int
    prompts: Prompts
    length_rng: Any
    gen_kwargs: dict[str, Any]


def build_parser() -> argparse.ArgumentParser:
    """The command line; any other ``--section.key value`` flags are settings (``load_settings``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Other flags: --section.key value, the project's setting names "
                                            "(e.g. --ppo.batch_size 32 --ppo.mini_batch_size 32).")
    parser.add_argument("--config", default="configs/stand-in.yaml",
                        help="the project's settings file (relative to the repository root); '' for none")
    parser.add_argument("--steps", type=int, default=None, help="PPO steps (default: run.steps of the config)")
    parser.add_argument("--seed", type=int, default=None, help="seed (default: run.seed of the config)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--out", default=None, help="JSON lines file: one line per step, then a summary")
    parser.add_argument("--save-policy", default=None,
                        help="save the tuned policy (causal LM and tokenizer, no value head) to this folder")
    return parser


def ppo_config(s: dict[str, Any], seed: int) -> Any:
    """TRL's ``PPOConfig`` from the settings."""
    from trl import PPOConfig

    return PPOConfig(
        seed=seed, learning_rate=s["ppo.learning_rate"], batch_size=s["ppo.batch_size"],
        mini_batch_size=s["ppo.mini_batch_size"], ppo_epochs=s["ppo.ppo_epochs"], gamma=s["ppo.gamma"],
        lam=s["ppo.lam"], cliprange=s["ppo.cliprange"], cliprange_value=s["ppo.cliprange_value"],
        vf_coef=s["ppo.vf_coef"], ratio_threshold=s["ppo.ratio_threshold"], kl_penalty=s["ppo.kl_penalty"],
        adap_kl_ctrl=s["ppo.adap_kl_ctrl"], init_kl_coef=s["ppo.init_kl_coef"], target=s["ppo.target"],
        horizon=s["ppo.horizon"], log_with=None)


def load_reward_model(s: dict[str, Any], device: Any) -> tuple[Any, Any, int]:
    """The reward model's tokenizer, the model (on the trainer's device, eval mode) and the index
    of ``reward.positive_label``, found by its name."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    reward_tok = AutoTokenizer.from_pretrained(s["reward.model"])
    reward_model = AutoModelForSequenceClassification.from_pretrained(
        s["reward.model"], torch_dtype=torch.float32).to(device).eval()
    by_name = {name: int(i) for i, name in reward_model.config.id2label.items()}
    if s["reward.positive_label"] not in by_name:
        raise SystemExit(f"error: reward model has no label {s['reward.positive_label']!r} ({sorted(by_name)})")
    return reward_tok, reward_model, by_name[s["reward.positive_label"]]


def load_reference(s: dict[str, Any], seed: int, threads: int) -> tuple[Reference, dict[str, Any]]:
    """Imports TRL and its stack, loads the models and builds the trainer; returns them with the
    versions, threads and device (for the summary)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # "PPOTrainer is deprecated"
    warnings.filterwarnings("ignore", message=".*No dataset is provided.*")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import numpy as np
    import torch
    import transformers
    import trl
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOTrainer

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()

    config = ppo_config(s, seed)
    # The notebook: value-head policy; the reference model a frozen copy (PPOTrainer makes it).
    # The value head is initialised at load time, before PPOTrainer seeds: seed it too, or every
    # run of the same seed starts from another value head (as the notebook's runs did).
    transformers.set_seed(seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(s["rollout.policy"], torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(s["rollout.policy"])
    tokenizer.pad_token = tokenizer.eos_token
    trainer = PPOTrainer(config, model, ref_model=None, tokenizer=tokenizer)  # set_seed(seed) inside
    device = trainer.accelerator.device
    reward_tok, reward_model, positive = load_reward_model(s, device)

    prompts = Prompts(s, tokenizer, seed)
    length_rng = np.random.default_rng([seed, 11])  # per-query response lengths
    gen_kwargs = {"min_length": -1, "top_k": s["rollout.top_k"], "top_p": s["rollout.top_p"],
                  "temperature": s["rollout.temperature"], "do_sample": True, "pad_token_id": tokenizer.eos_token_id}
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(), "device": str(device)}
    return Reference(s=s, config=config, trainer=trainer, tokenizer=tokenizer, device=device, reward_tok=reward_tok,
                     reward_model=reward_model, positive=positive, prompts=prompts, length_rng=length_rng,
                     gen_kwargs=gen_kwargs), info


def run_step(ref: Reference, step: int) -> dict[str, Any]:
    """One step of the loop (the module docstring's 1 to 4); returns its statistics row."""
    import torch

    s, tokenizer = ref.s, ref.tokenizer
    t0 = time.perf_counter()
    queries = [torch.tensor(q, dtype=torch.long, device=ref.device) for q in ref.prompts.next_batch()]
    lengths = ref.length_rng.integers(s["rollout.response_min_tokens"], s["rollout.response_max_tokens"] + 1,
                                      size=len(queries)).tolist()
    # 2. generate: one call for the whole batch, to the longest drawn length, then cut.
    t1 = time.perf_counter()
    generated = ref.trainer.generate(queries, batch_size=len(queries), return_prompt=False,
                                     max_new_tokens=max(lengths), **ref.gen_kwargs)  # cut after first EOS
    responses = [r[:n] for r, n in zip(generated, lengths)]
    t2 = time.perf_counter()
    # 3. score: raw POSITIVE logit of query text + response text, one padded forward pass.
    texts = [tokenizer.decode(q, skip_special_tokens=True) + tokenizer.decode(r, skip_special_tokens=True)
             for q, r in zip(queries, responses)]
    with torch.inference_mode():
        enc = ref.reward_tok(texts, padding=True, truncation=True, max_length=s["reward.max_length"],
                             return_tensors="pt").to(ref.device)
        logits = ref.reward_model(**enc).logits[:, ref.positive].float().cpu()
    scores = [x.clone() for x in logits]
    t3 = time.perf_counter()
    # 4. the PPO step
    stats = ref.trainer.step(queries, responses, scores)
    t4 = time.perf_counter()
    return {
        "step": step, "env/reward_mean": float(logits.mean()),
        "env/reward_std": float(logits.std()) if len(logits) > 1 else 0.0,
        "objective/kl": float(stats["objective/kl"]), "objective/kl_coef": float(stats["objective/kl_coef"]),
        "tokens/responses_len_mean": _mean([float(len(r)) for r in responses]),
        "time/data": t1 - t0, "time/generate": t2 - t1, "time/score": t3 - t2, "time/update": t4 - t3,
        "time/step": t4 - t0, "samples_per_second": len(queries) / (t4 - t0),
    }


def step_summary(rows: list[dict[str, Any]], batch_size: int) -> dict[str, Any]:
    """The summary's speed and reward: mean phase times and samples per second without the first
    step (it warms up) unless it is the only one, the mean reward of the first and last 5 steps."""
    timed = rows[1:] if len(rows) > 1 else rows  # the first step warms up
    return {
        "warmup_steps_excluded": len(rows) - len(timed),
        **{f"mean/{k}": _mean([r[k] for r in timed])
           for k in ("time/data", "time/generate", "time/score", "time/update", "time/step")},
        "samples_per_second": batch_size * len(timed) / sum(r["time/step"] for r in timed),
        "reward_mean_last5": _mean([r["env/reward_mean"] for r in rows[-5:]]),
        "reward_mean_first5": _mean([r["env/reward_mean"] for r in rows[:5]]),
    }


def main(argv: list[str] | None = None) -> int:
    """Loads the reference, runs its steps, writes a line per step and the summary, saves the policy."""
    args, rest = build_parser().parse_known_args(argv)
    s, ignored = load_settings(args.config or None, rest)
    steps = args.steps if args.steps is not None else s["run.steps"]
    seed = args.seed if args.seed is not None else s["run.seed"]
    if steps <= 0:
        raise SystemExit("error: give --steps (the config has run.steps 0)")

    t_start = time.perf_counter()
    ref, info = load_reference(s, seed, args.threads)
    load_seconds = time.perf_counter() - t_start
    print(f"reference (TRL {info['trl']}, transformers {info['transformers']}, torch {info['torch']}, "
          f"{info['threads']} threads): {len(ref.prompts.texts)} reviews, batch {ref.config.batch_size}, "
          f"{steps} steps, seed {seed}; loaded in {load_seconds:.1f}s"
          + (f"; ignored config keys: {', '.join(ignored)}" if ignored else ""), flush=True)

    out = open(args.out, "w") if args.out else None
    rows: list[dict[str, Any]] = []
    try:
        for step in range(steps):
            row = run_step(ref, step)
            rows.append(row)
            if out:
                out.write(json.dumps(row) + "\n")
                out.flush()
            print(f"step {step + 1}/{steps}  reward {row['env/reward_mean']:+.3f}  kl {row['objective/kl']:.3f}  "
                  f"gen {row['time/generate']:.2f}s  score {row['time/score']:.2f}s  "
                  f"update {row['time/update']:.2f}s  {row['samples_per_second']:.1f} samples/s", flush=True)
        summary = {
            "summary": True, "trainer": "trl-legacy-PPOTrainer", "steps": steps, "seed": seed,
            "batch_size": ref.config.batch_size, **step_summary(rows, ref.config.batch_size),
            "load_seconds": load_seconds, "wall_seconds": time.perf_counter() - t_start, **info,
            "settings": s,
        }
        if args.save_policy:  # for held-out scoring by the project's own code (benchmarks/compare.py)
            ref.trainer.model.pretrained_model.save_pretrained(args.save_policy, safe_serialization=True)
            ref.tokenizer.save_pretrained(args.save_policy)
            summary["policy"] = str(Path(args.save_policy).resolve())
        if out:
            out.write(json.dumps(summary) + "\n")
        print(f"reference: {summary['samples_per_second']:.1f} samples/s "
              f"({'without' if summary['warmup_steps_excluded'] else 'with'} the first step), "
              f"reward last 5 steps {summary['reward_mean_last5']:+.3f}", flush=True)
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
