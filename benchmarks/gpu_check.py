"""The plain rollout worker, scorer and learner classes on one GPU, without Ray.

    python benchmarks/gpu_check.py --assets DIR [--steps 3] [--batch 128] [--device cuda]

DIR holds a copy of ``shared/models/gpt2-imdb-mini`` (its tokenizer is reused for the
random GPT-2-small policy) and ``shared/models/distilbert-imdb-mini`` (the reward model).
For a GPT-2-small-sized policy (GPT2Config() defaults, 124M parameters, random weights:
the hub is unreachable) and for the stand-in policy, it times the recipe's step at batch
128: generation (one batched sampling loop), scoring, the PPO update, and the in-process weight
hand-over (learner.weights() -> worker.load_weights), after one warm-up step; the
GPT-2-small learner once more with bf16 autocast (ppo.bf16). Prints a
table and writes gpu_check.json to $OUT (or the current directory).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from actors.rollout import RolloutSettings, RolloutWorker
from learner.config import PPOConfig
from learner.core.actor import LearnerActor
from rewards.scorer import RewardSettings, SentimentScorer

OPENINGS = [
    "This movie was", "I rented this film", "The acting in this", "What a waste of", "This has to be one of the",
    "I have never seen", "The plot of this movie", "My wife and I", "When I first saw", "It is hard to believe",
    "The director of this", "Although the cast", "I went to see this", "After reading the reviews", "The story is",
    "If you like horror",
]


def queries(tokenizer, n: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = tokenizer(OPENINGS[i % len(OPENINGS)] + " and then it", add_special_tokens=False)["input_ids"]
        k = int(torch.randint(2, 8, (1,), generator=gen))
        out.append(ids[:k])
    return out


def random_gpt2_small(tokenizer_dir: Path, folder: Path) -> Path:
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    cfg = GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)  # 124M, vocab 50257
    GPT2LMHeadModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(policy: Path, reward: Path, device: str, batch: int, steps: int, bf16: bool = False) -> dict:
    cfg = PPOConfig(batch_size=batch, mini_batch_size=batch, learning_rate=1.41e-5, bf16=bf16)
    worker = RolloutWorker(RolloutSettings(policy=str(policy), device=device, torch_threads=8))
    scorer = SentimentScorer(RewardSettings(model=str(reward), device=device, torch_threads=8))
    learner = LearnerActor(str(policy), cfg, device=device, torch_threads=8)
    qs = queries(learner.learner.tokenizer, batch, 0)
    times: dict[str, list[float]] = {"generate": [], "score": [], "update": [], "handover": [], "step": []}
    for step in range(steps + 1):  # step 0 warms up kernels and allocators
        sync(device)
        t0 = time.perf_counter()
        ro = worker.generate(qs, step, 0)
        sync(device)
        t1 = time.perf_counter()
        scores = scorer.score(ro.texts)
        sync(device)
        t2 = time.perf_counter()
        learner.step(qs, ro.responses, scores)
        sync(device)
        t3 = time.perf_counter()
        version, weights = learner.weights()
        worker.load_weights(weights, version)
        sync(device)
        t4 = time.perf_counter()
        if step:
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                times[k].append(v)
    params = sum(p.numel() for p in learner.learner.model.parameters())
    out = {k: statistics.median(v) for k, v in times.items()}
    out.update(params=params, samples_per_second=batch / out["step"],
               peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--assets", type=Path, required=True, help="folder with the policy and reward model folders")
    ap.add_argument("--steps", type=int, default=3, help="timed steps")
    ap.add_argument("--batch", type=int, default=128, help="rollouts per step")
    ap.add_argument("--device", default="cuda", help="torch device")
    args = ap.parse_args()
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}  torch {torch.__version__}  batch {args.batch}", flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        small = random_gpt2_small(args.assets / "gpt2-imdb-mini", Path(tmp) / "gpt2-small-random")
        for label, policy, bf16 in (("stand-in (6.9M)", args.assets / "gpt2-imdb-mini", False),
                                    ("gpt2-small (124M)", small, False), ("gpt2-small bf16", small, True)):
            results[label] = run(policy, args.assets / "distilbert-imdb-mini", args.device, args.batch, args.steps,
                                 bf16)
            r = results[label]
            print(f"{label:18s} params {r['params'] / 1e6:6.1f}M  generate {r['generate']:.3f}s  score {r['score']:.3f}s"
                  f"  update {r['update']:.3f}s  handover {r['handover']:.3f}s  step {r['step']:.3f}s"
                  f"  {r['samples_per_second']:.1f} samples/s  peak {r['peak_gib']:.2f} GiB", flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "gpu_check.json").write_text(json.dumps({"device": name, "torch": torch.__version__,
                                                    "batch": args.batch, "results": results}, indent=1))


if __name__ == "__main__":
    main()
