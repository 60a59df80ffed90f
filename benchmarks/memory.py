"""The learner's peak memory per policy parameter, by mode, and the largest policy that fits.

    python benchmarks/memory.py                      # the stand-in and a GPT-2-small-sized policy
    python benchmarks/memory.py --json benchmarks/results/memory.json

Each (policy, mode) runs in a fresh process: a ``LearnerActor`` (policy, value head, reference or
adapters, Adam) takes one PPO step on a fixed batch (8 rollouts of 16 query + 48 response
tokens, one minibatch, 2 epochs: the second runs with Adam's moments allocated). The figure is the
process's peak resident memory (VmHWM; on a GPU, ``torch.cuda.max_memory_allocated``)
minus its resident memory once torch and transformers are imported, divided by the policy's
parameter count. Modes: full fp32 (the default), + bf16 autocast, + micro-batches of a quarter
of the minibatch, + gradient checkpointing (with the micro-batches), and LoRA (rank 8 on c_attn,
c_proj and c_fc, with micro-batches and checkpointing). The GPT-2-small-sized policy is
``GPT2Config()`` (124M parameters, random weights: the hub is unreachable here) with the
stand-in's tokenizer. From each mode's bytes per parameter at GPT-2 small: the largest policy
whose learner fits in 24 GB and in 80 GB, the figures scaling with the parameter count
(activations grow more slowly with width than weights do, so this is on the safe side for
larger models at this batch shape).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
STAND_IN = REPO.parent / "shared" / "models" / "gpt2-imdb-mini"

MODES = {
    "full fp32": {},
    "+ bf16 autocast": {"bf16": True},
    "+ micro-batches (1/4)": {"micro_batch_size": 2},
    "+ gradient checkpointing": {"micro_batch_size": 2, "gradient_checkpointing": True},
    "LoRA r=8": {"micro_batch_size": 2, "gradient_checkpointing": True, "lora_rank": 8,
                 "lora_target_modules": "c_attn,c_proj,c_fc"},
}
BATCH, QUERY, RESPONSE = 8, 16, 48


def rss_bytes() -> int:
    """This process's peak resident memory so far (Linux's VmHWM: unlike ru_maxrss, it starts
    afresh at exec instead of carrying over the parent's peak)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024  # kB


def measure_one(policy: str, mode: str) -> dict:
    """In this process: the learner's two steps in ``mode``; peak memory above the start."""
    import torch

    from learner.config import PPOConfig
    from learner.core.actor import LearnerActor

    cuda = torch.cuda.is_available()
    start = torch.cuda.memory_allocated() if cuda else rss_bytes()
    cfg = PPOConfig(batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=2, learning_rate=1e-5, **MODES[mode])
    learner = LearnerActor(policy, cfg, seed=0, device="auto", torch_threads=os.cpu_count() or 1)
    gen = torch.Generator().manual_seed(0)
    queries = torch.randint(3, 5000, (BATCH, QUERY), generator=gen).tolist()
    responses = torch.randint(3, 5000, (BATCH, RESPONSE), generator=gen).tolist()
    learner.step(queries, responses, [float(i % 3) - 1 for i in range(BATCH)])
    peak = torch.cuda.max_memory_allocated() if cuda else rss_bytes()
    params = sum(p.numel() for n, p in learner.learner.model.pretrained_model.named_parameters() if "lora_" not in n)
    return {"mode": mode, "params": params, "peak_bytes": peak - start,
            "bytes_per_param": (peak - start) / params, "memory": "cuda allocated" if cuda else "CPU RSS"}


def random_gpt2_small(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(STAND_IN)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else "?"
    import torch

    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, torch {torch.__version__}"


def largest(bytes_per_param: float, budget_gb: float) -> float:
    """Parameters (billions) whose learner fits ``budget_gb`` at this many bytes per parameter."""
    return budget_gb * 1e9 / bytes_per_param / 1e9


def table(rows: list[dict]) -> str:
    lines = ["| policy | mode | parameters | peak above start | bytes / parameter | fits 24 GB | fits 80 GB |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        fit = (f"{largest(r['bytes_per_param'], 24):.2f}B", f"{largest(r['bytes_per_param'], 80):.2f}B") \
            if r["policy"] == "gpt2-small" else ("", "")
        lines.append(f"| {r['policy']} | {r['mode']} | {r['params'] / 1e6:.1f}M | {r['peak_bytes'] / 2**20:.0f} MiB "
                     f"| {r['bytes_per_param']:.1f} | {fit[0]} | {fit[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--one", nargs=2, metavar=("POLICY", "MODE"),
                        help="measure one policy folder in one mode in this process (what each row's process runs)")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_one(*args.one)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        policies = {"stand-in": str(STAND_IN), "gpt2-small": str(random_gpt2_small(Path(tmp) / "gpt2-small"))}
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        for name, path in policies.items():
            for mode in MODES:
                out = subprocess.run([sys.executable, __file__, "--one", path, mode], env=env, check=True,
                                     capture_output=True, text=True).stdout
                rows.append({"policy": name, **json.loads(out.strip().splitlines()[-1])})
                print(f"{name:<10} {mode:<26} {rows[-1]['bytes_per_param']:.1f} bytes/param", flush=True)
    print(f"\nmachine: {machine()}\n\n{table(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
