"""Weight broadcast, object store against collective, for the stand-in policy and a GPT-2-small-sized model.

    HF_HUB_OFFLINE=1 python benchmarks/broadcast.py                  # 2 rollout actors
    HF_HUB_OFFLINE=1 python benchmarks/broadcast.py --actors 4 --repeats 7

On an embedded Ray (logical CPUs declared, every actor num_cpus=0, a small object store), one
sender actor (stands in for the learner: the same causal LM, loaded with AutoModelForCausalLM)
and N ``RolloutWorker`` actors. Each model is timed on both paths, from the driver:

- object store: the sender returns (version, dict of numpy arrays) with ``num_returns=2`` (its
  weights are copied to CPU numpy and put into the object store once, as ``PPOLearner.weights``
  does); the driver waits for the version, then every worker's ``load_weights(ref, version)``;
  ``put`` is the first part alone;
- collective: ``actors.collective.send`` on the sender and ``RolloutWorker.receive_weights`` on
  every worker at once; gloo (CPU buffers), and NCCL when at least N + 1 GPUs are visible (then
  every actor gets one GPU).

Median and min over ``--repeats`` after ``--warmup`` rounds. "moved" is params x 4 bytes x
receivers (fp32), GB/s is moved / median. "collective" keeps its flat buffers between broadcasts
(the default), "coll. fresh" allocates them every time (``keep_buffers=False``). The GPT-2-small-sized model is ``GPT2Config()``
(124M parameters, random weights), built in memory and saved to a temporary folder (with the
stand-in's tokenizer) so that RolloutWorker can load it.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from actors import collective  # noqa: E402
from benchmarks.compare import cpu_model  # noqa: E402
from actors.rollout import RolloutSettings, RolloutWorker, tied_duplicates  # noqa: E402

SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared")).resolve()
STAND_IN = SHARED / "models" / "gpt2-imdb-mini"


class Sender:
    """The learner's side: holds the causal LM on its device; sends it either way."""

    def __init__(self, policy: str, device: str, torch_threads: int) -> None:
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(torch_threads)
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).to(self.device).eval()
        self.tied = tied_duplicates(self.model)
        self.group = None

    def numel(self) -> int:
        return sum(t.numel() for t in collective.lm_tensors(self.model))

    def weights(self, version: int) -> tuple[int, dict[str, np.ndarray]]:
        """As PPOLearner.weights: call with num_returns=2 so the dict stays in the object store."""
        return version, {name: t.detach().to("cpu", copy=True).numpy()
                         for name, t in self.model.state_dict().items() if name not in self.tied}

    def address(self) -> str:
        return collective.local_init_method()

    def join(self, init_method: str, world_size: int, backend: str, timeout_s: float, keep_buffers: bool) -> None:
        self.leave()
        self.group = collective.WeightGroup(init_method, 0, world_size, backend, timeout_s, group_name="bench",
                                            device=self.device if backend == "nccl" else "cpu",
                                            keep_buffers=keep_buffers)

    def send(self, version: int) -> None:
        collective.send(self.group, version, collective.lm_tensors(self.model))
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def leave(self) -> None:
        if self.group is not None:
            self.group.destroy()
            self.group = None


def machine() -> str:
    cpu = cpu_model()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{os.cpu_count()} CPUs ({cpu}); GPUs: {', '.join(gpus) if gpus else 'none'}; load avg {load}; "
            f"torch {torch.__version__}, ray {ray.__version__}, python {platform.python_version()}")


def gpt2_small_folder(root: Path) -> Path:
    """GPT2Config() with random weights, saved with the stand-in's tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    folder = root / "gpt2-small-random"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(STAND_IN).save_pretrained(folder)
    return folder


def timed(fn, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def bench_model(label: str, folder: Path, args, backends: list[str]) -> list[dict]:
    n, timeout = args.actors, args.timeout_s
    use_gpu = "nccl" in backends
    sender = ray.remote(Sender).options(num_cpus=0, num_gpus=1 if use_gpu else 0).remote(
        str(folder), "cuda" if use_gpu else "cpu", args.torch_threads)
    settings = RolloutSettings(policy=str(folder), torch_threads=args.torch_threads,
                               device="cuda" if use_gpu else "cpu")
    workers = [ray.remote(RolloutWorker).options(num_cpus=0, num_gpus=1 if use_gpu else 0).remote(settings)
               for _ in range(n)]
    ray.get([sender.numel.remote()] + [w.ping.remote() for w in workers], timeout=timeout)
    numel = ray.get(sender.numel.remote())
    moved = numel * 4 * n
    rows = []
    counter = iter(range(1, 10**9))

    # Object store: the sender puts once, every worker loads that copy (as Driver.broadcast).
    put_times: list[float] = []

    def object_store() -> None:
        start = time.perf_counter()
        version_ref, weights_ref = sender.weights.options(num_returns=2).remote(next(counter))
        version = ray.get(version_ref, timeout=timeout)
        put_times.append(time.perf_counter() - start)
        got = ray.get([w.load_weights.remote(weights_ref, version) for w in workers], timeout=timeout)
        assert got == [version] * n, got
        del weights_ref

    times = timed(object_store, args.warmup, args.repeats)
    rows.append(dict(model=label, numel=numel, path="object store", backend="-", times=times,
                     put=statistics.median(put_times[args.warmup:]), moved=moved))

    for backend, keep in [(b, k) for b in backends for k in (True, False)]:
        addr = ray.get(sender.address.remote())
        start = time.perf_counter()
        ray.get([sender.join.remote(addr, n + 1, backend, timeout, keep)] +
                [w.join_weight_group.remote(addr, i + 1, n + 1, backend, timeout, keep)
                 for i, w in enumerate(workers)], timeout=2 * timeout)
        join_s = time.perf_counter() - start

        def coll() -> None:
            version = next(counter)
            got = ray.get([sender.send.remote(version)] + [w.receive_weights.remote() for w in workers],
                          timeout=timeout)
            assert got[1:] == [version] * n, got

        times = timed(coll, args.warmup, args.repeats)
        rows.append(dict(model=label, numel=numel, path="collective" if keep else "coll. fresh", backend=backend,
                         times=times, put=None, join=join_s, moved=moved))
        ray.get([sender.leave.remote()] + [w.leave_weight_group.remote() for w in workers], timeout=timeout)

    # The last broadcast must have landed everywhere, bit for bit.
    ref = ray.get(sender.weights.options(num_returns=2).remote(0)[1], timeout=timeout)
    for got in ray.get([w.get_weights.remote() for w in workers], timeout=timeout):
        assert all(np.array_equal(got[k], v) for k, v in ref.items())
    for actor in [sender, *workers]:
        ray.kill(actor)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--actors", type=int, default=2, help="rollout actors (receivers)")
    parser.add_argument("--repeats", type=int, default=5, help="timed broadcasts per model and path")
    parser.add_argument("--warmup", type=int, default=1, help="untimed broadcasts first")
    parser.add_argument("--models", default="stand-in,gpt2-small", help="comma list of: stand-in, gpt2-small")
    parser.add_argument("--object-store-gb", type=float, default=1.5, help="Ray object store size")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per actor")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="longest wait for one broadcast")
    args = parser.parse_args(argv)

    ngpu = torch.cuda.device_count()
    backends = ["gloo"]
    note = ""
    if ngpu >= args.actors + 1:
        backends.append("nccl")
    elif ngpu:
        note = f"nccl skipped: needs {args.actors + 1} GPUs (one per rank), {ngpu} visible"
    else:
        note = "nccl skipped: no CUDA"

    ray.init(num_cpus=args.actors + 2, num_gpus=ngpu, include_dashboard=False, log_to_driver=False,
             object_store_memory=int(args.object_store_gb * 1024**3))
    tmp = Path(tempfile.mkdtemp(prefix="bcast-"))
    rows: list[dict] = []
    try:
        for label in [m.strip() for m in args.models.split(",") if m.strip()]:
            if label == "stand-in":
                folder = STAND_IN
            elif label == "gpt2-small":
                folder = gpt2_small_folder(tmp)
            else:
                parser.error(f"unknown model {label!r}")
            # nccl rows need GPU actors; gloo / object store rows stay on CPU actors.
            rows += bench_model(label, folder, args, ["gloo"])
            if "nccl" in backends:
                rows += [r for r in bench_model(label, folder, args, ["nccl"]) if r["backend"] == "nccl"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()

    print(f"machine: {machine()}")
    print(f"{args.actors} rollout actors (receivers), median/min of {args.repeats} after {args.warmup} warm-up; "
          f"moved = params x 4 B x receivers" + (f"; {note}" if note else ""))
    head = f"{'model':<11} {'params':>8} {'path':<12} {'backend':<7} {'median s':>9} {'min s':>8} " \
           f"{'put s':>7} {'join s':>7} {'moved MB':>9} {'GB/s':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        med = statistics.median(r["times"])
        put = f"{r['put']:.3f}" if r.get("put") is not None else "-"
        join = f"{r['join']:.2f}" if r.get("join") is not None else "-"
        print(f"{r['model']:<11} {r['numel'] / 1e6:>7.1f}M {r['path']:<12} {r['backend']:<7} {med:>9.3f} "
              f"{min(r['times']):>8.3f} {put:>7} {join:>7} {r['moved'] / 1e6:>9.1f} {r['moved'] / med / 1e9:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
