"""Ray side of the driver: connect or start Ray, reserve resources, spawn the named actors.

All of a run's resources are reserved up front in one placement group: a job either gets
everything (learner, every rollout actor, every reward replica) or stops after
``cluster.placement_timeout_s`` with a message listing what it asked for and what the
cluster has, never a silent wait.
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.rollout import RolloutWorker
from learner.config import ClusterConfig, Config
from learner.core.actor import LearnerActor
from learner.orchestration.recovery import Fleet
from rewards.server import RewardServer

log = logging.getLogger(__name__)

# Passed on to every actor, so offline settings reach actors on other nodes too.
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_DATASETS_OFFLINE")


class PlacementError(RuntimeError):
    """The run's resources cannot be had; the message says what is missing."""


def connect(cfg: Config, namespace: str) -> dict[str, Any]:
    """Join the cluster at cluster.address / RAY_ADDRESS, or start Ray on this machine.

    Returns {"dashboard_url"}. Embedded Ray declares logical CPUs for every
    actor of the run (actors that mostly wait cost little; torch threads are set per
    actor), and the GPUs torch sees.
    """
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS", "")
    # A submitted job's own runtime env may set the same variables; Ray refuses to merge
    # two values for one key, so those are left to the job.
    job = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    job_env = (ray.job_config.JobConfig.from_json(json.loads(job)).runtime_env or {}).get("env_vars", {}) if job else {}
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ and k not in job_env}
    runtime_env = {"env_vars": env} if env else None
    if address:
        ctx = ray.init(address=address, namespace=namespace, runtime_env=runtime_env, log_to_driver=True,
                       logging_level=logging.WARNING)
    else:
        import torch

        c = cfg.cluster
        need_cpus = c.learner_cpus * c.learner_processes + c.num_rollout_workers + c.num_reward_workers
        ctx = ray.init(num_cpus=max(int(need_cpus + 0.999), os.cpu_count() or 1),
                       num_gpus=torch.cuda.device_count(), namespace=namespace, runtime_env=runtime_env,
                       include_dashboard=True, dashboard_host="127.0.0.1",
                       # The driver prints the dashboard's address itself; Ray's INFO lines are noise.
                       logging_level=logging.WARNING)
    url = getattr(ctx, "dashboard_url", None) or ""
    if url and not url.startswith("http"):
        url = f"http://{url}"
    return {"dashboard_url": url}


@dataclass
class Roles:
    """GPUs and CPUs each role asks for, after 'auto' (-1) is resolved against the cluster."""

    learner_gpus: float
    learner_cpus: float
    rollout_gpus: float
    reward_gpus: float

    def bundles(self, cfg: Config) -> list[dict[str, float]]:
        """One bundle per learner rank first, then one per rollout actor, then one per reward replica."""
        def bundle(cpus: float, gpus: float) -> dict[str, float]:
            return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}

        n, r = cfg.cluster.num_rollout_workers, cfg.cluster.num_reward_workers
        return ([bundle(self.learner_cpus, self.learner_gpus)] * cfg.cluster.learner_processes
                + [bundle(1, self.rollout_gpus)] * n + [bundle(1, self.reward_gpus)] * r)


def plan_roles(cluster: ClusterConfig, gpus_per_node: list[float]) -> Roles:
    """Each role's GPUs, fitted to the cluster's shape (a pure function of it, so tests need no Ray).

    Settings >= 0 win; -1 (the default) is placed by what the cluster has:
    - no GPU anywhere: every role on CPU;
    - one node with one GPU (a workstation): every role gets an equal share of it;
    - one node with several: each learner rank gets a GPU of its own, rollout and reward actors
      share the rest (a share never spans two GPUs, so each is 1/k of one GPU);
    - several nodes with GPUs: one GPU per role (an autoscaler adds GPU nodes as needed).

    Several learner ranks on GPUs need a whole GPU each: NCCL refuses two ranks of one group on
    one device, and a fractional share may land them there. A plan that would do so is a
    PlacementError saying what to change.
    """
    n, r, w = cluster.num_rollout_workers, cluster.num_reward_workers, cluster.learner_processes
    gpu_nodes = [g for g in gpus_per_node if g > 0]
    if w > 1 and 0 < cluster.learner_gpus < 1:
        raise PlacementError(f"cluster.learner_gpus={cluster.learner_gpus:g} with cluster.learner_processes={w}: each "
                             "data-parallel rank needs a whole GPU (NCCL puts one rank on a device); set "
                             "--cluster.learner_gpus 1, or --cluster.learner_processes 1")
    if not gpu_nodes:
        auto_learner = auto_other = 0.0
    elif len(gpus_per_node) == 1 and gpu_nodes[0] < w + 1:
        if w > 1 and cluster.learner_gpus < 0:
            g = int(gpu_nodes[0])
            raise PlacementError(
                f"cluster.learner_processes={w} data-parallel ranks need a GPU each (NCCL puts one rank on a device) "
                f"and the rollout and reward actors one more, but this machine has {g}: set "
                f"--cluster.learner_processes {max(1, g - 1)}, or --cluster.learner_gpus 0 to keep the learner on CPU")
        auto_learner = auto_other = _share(w + n + r, int(gpu_nodes[0]) or 1)
    elif len(gpus_per_node) == 1:
        auto_learner, auto_other = 1.0, _share(n + r, int(gpu_nodes[0]) - w)
    else:
        auto_learner = auto_other = 1.0
    pick = lambda v, auto: auto if v < 0 else v  # noqa: E731
    return Roles(pick(cluster.learner_gpus, auto_learner), cluster.learner_cpus,
                 pick(cluster.rollout_gpus, auto_other), pick(cluster.reward_gpus, auto_other))


def _share(actors: int, gpus: int) -> float:
    """The GPU share that fits ``actors`` actors on ``gpus`` whole GPUs: 1 each when there are
    enough, else 1/k with k = actors per GPU, rounded down to Ray's 1e-4 granularity."""
    per_gpu = -(-actors // gpus)  # ceil
    return 1.0 if per_gpu <= 1 else math.floor(10_000 / per_gpu) / 10_000


def resolve_roles(cfg: Config) -> Roles:
    """The plan for the cluster Ray reports; PlacementError if a fixed machine cannot hold it."""
    nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
    roles = plan_roles(cfg.cluster, [nd["Resources"].get("GPU", 0.0) for nd in nodes])
    c = cfg.cluster
    asked = roles.learner_gpus * c.learner_processes + c.num_rollout_workers * roles.rollout_gpus + c.num_reward_workers * roles.reward_gpus
    total = ray.cluster_resources().get("GPU", 0)
    if asked > total + 1e-9 and not c.address and not os.environ.get("RAY_ADDRESS"):
        # On a fixed machine more GPUs can never appear; on a cluster an autoscaler may add them.
        raise PlacementError(f"the run asks for {asked:g} GPUs (cluster.learner_gpus/rollout_gpus/reward_gpus) but this "
                             f"machine has {total:g}; lower them, or leave them at -1 to fit the machine")
    return roles


def describe(cfg: Config, roles: Roles, pings: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """The plan as it landed, per actor: node address, GPU share and CPUs it reserved, device;
    for the learner, these are rank 0's and each other rank's, and ``ranks`` says how many.
    The driver prints it at start and actors.json records it (with each actor's pid)."""
    n, r = cfg.cluster.num_rollout_workers, cfg.cluster.num_reward_workers
    shares = {"learner": (roles.learner_gpus, roles.learner_cpus)}  # each rank's
    shares.update({f"rollout-{i}": (roles.rollout_gpus, 0.0) for i in range(n)})
    shares.update({f"rewards-{i}": (roles.reward_gpus, 0.0) for i in range(r)})
    address = {nd["NodeID"]: nd.get("NodeManagerAddress", "?") for nd in ray.nodes()}
    plan = {name: {"node": address.get(pings.get(name, {}).get("node_id"), "?"), "gpus": gpus, "cpus": cpus,
                   "device": pings.get(name, {}).get("device", "?")}
            for name, (gpus, cpus) in shares.items()}
    plan["learner"]["ranks"] = cfg.cluster.learner_processes
    return plan


def reserve(cfg: Config, roles: Roles) -> PlacementGroup:
    """One placement group for the whole run; PlacementError if it is not granted in time."""
    bundles = roles.bundles(cfg)
    pg = placement_group(bundles, strategy=cfg.cluster.placement_strategy, name="ppo-run")
    try:
        ray.get(pg.ready(), timeout=cfg.cluster.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(pg)
        asked = _total(bundles)
        raise PlacementError(
            f"resources not granted within cluster.placement_timeout_s={cfg.cluster.placement_timeout_s:g}s: the run "
            f"asks for {_fmt(asked)} as {len(bundles)} bundles ({cfg.cluster.placement_strategy}); the cluster has "
            f"{_fmt(ray.cluster_resources())}, available {_fmt(ray.available_resources())}. Add nodes, or lower "
            "cluster.num_rollout_workers / *_gpus / learner_cpus") from None
    return pg


def _total(bundles: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            out[k] = out.get(k, 0) + v
    return out


def _fmt(resources: dict[str, float]) -> str:
    keys = [k for k in ("CPU", "GPU") if k in resources] or list(resources)[:3]
    return ", ".join(f"{resources[k]:g} {k}" for k in keys) or "nothing"


def threads(cfg: Config) -> tuple[int, int]:
    """(learner threads, rollout/reward threads). The phases of a step run one after the
    other, so the learner may use every core while it updates; rollout actors generate at
    the same time as each other, so they share the cores."""
    if cfg.cluster.torch_threads:
        return cfg.cluster.torch_threads, cfg.cluster.torch_threads
    cores = os.cpu_count() or 1
    return cores, max(1, cores // cfg.cluster.num_rollout_workers)


def spawn_learner(cfg: Config, roles: Roles, pg: PlacementGroup, name: str = "learner") -> list[Any]:
    """The learner's ranks, rank r in bundle r with the bundle's CPUs and GPUs, joined into one
    DDP group (rendezvous at rank 0's node); returns their handles, rank 0 first. Ray does not
    restart them (their state lives in memory): to replace a lost learner, the driver kills
    every rank of the old group and starts new ones here under new names (the dead one's may
    not be released yet), then loads the last checkpoint."""
    world, c = cfg.cluster.learner_processes, cfg.cluster
    ranks = [ray.remote(LearnerActor).options(
        name=name if r == 0 else f"{name}-rank{r}", num_cpus=roles.learner_cpus, num_gpus=roles.learner_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
    ).remote(cfg.policy, cfg.ppo, seed=cfg.run.seed, torch_threads=max(1, threads(cfg)[0] // world), rank=r,
             world=world, rollout_dtype=cfg.rollout.dtype) for r in range(world)]
    if world > 1:
        join_ranks(ranks, c.call_timeout_s)
    return ranks


def join_ranks(ranks: list[Any], timeout_s: float) -> None:
    """Forms the DDP group of the learner actors ``ranks`` (rank 0 first), waiting at most ``timeout_s``.

    A rank that dies while joining raises its error at once (the others would wait for it until
    their timeout), and a failed join kills every rank: a rank left waiting in the rendezvous
    would hold its bundle from the group that replaces it."""
    address = ranks[0].rendezvous.remote()  # every rank's join waits for it: no round trip here
    pending = [r.join.remote(address, timeout_s) for r in ranks]
    deadline = time.monotonic() + timeout_s
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not done:
                raise ray.exceptions.GetTimeoutError(f"the learner's ranks did not join within {timeout_s:g}s")
            ray.get(done)
    except BaseException:
        for rank in ranks:
            ray.kill(rank, no_restart=True)
        raise


def spawn(cfg: Config, roles: Roles, pg: PlacementGroup, functions: dict[str, Any] | None = None) -> Fleet:
    """Named actors in the run's bundles: 'learner', 'rewards-<i>', 'rollout-<i>'. ``functions``:
    Python reward functions given as objects (Ray pickles them by value where they cannot be imported)."""
    n, r = cfg.cluster.num_rollout_workers, cfg.cluster.num_reward_workers
    at = lambda i: PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=i)  # noqa: E731
    learner_threads, t = threads(cfg)
    # Rollout and reward actors mostly wait on each other and on the learner, so their
    # bundles hold the CPU and the actors ask for none.
    learners = spawn_learner(cfg, roles, pg)
    w = len(learners)
    # The reward actor scores while rollout actors wait for it: it may use every core.
    reward_settings = cfg.reward.for_actor(torch_threads=learner_threads)
    rewards = [
        ray.remote(RewardServer).options(
            name=f"rewards-{i}", num_cpus=0, num_gpus=roles.reward_gpus, max_concurrency=64,
            max_restarts=cfg.cluster.max_failures,
            scheduling_strategy=at(w + n + i),
        ).remote(reward_settings, callers=len(range(i, n, r)), functions=functions)  # rollout actor k scores with replica k % r
        for i in range(r)
    ]
    rollout_settings = cfg.rollout.for_actor(seed=cfg.run.seed, torch_threads=t)
    rollouts = [
        ray.remote(RolloutWorker).options(
            name=f"rollout-{i}", num_cpus=0, num_gpus=roles.rollout_gpus, scheduling_strategy=at(w + i),
            # Ray restarts a dead actor; the driver, not Ray, redoes its work (max_task_retries=0),
            # because the restarted actor must first get the current weights.
            max_restarts=cfg.cluster.max_failures,
        ).remote(rollout_settings, [f"rewards-{i}" for i in range(r)])  # names, not handles: RolloutWorker says why
        for i in range(n)
    ]
    return Fleet(learners[0], rollouts, rewards, learners[1:])
