"""Placement that fits the machine: the plan for 0, 1, 2 and 4 GPUs and a 3-node cluster
(a pure function, no Ray), an impossible request as one line, and a default run on a
one-GPU machine (a Ray node that declares one logical GPU; torch sees none, so every role
still computes on CPU, which is what the rollout and reward code must then pick).
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from learner.config import ClusterConfig, Config
from learner.orchestration.placement import PlacementError, Roles, plan_roles, resolve_roles

from conftest import REPO
from localcluster import started_cluster


def fits(roles: Roles, cluster: ClusterConfig, gpus: int) -> bool:
    """First-fit of every role's share onto ``gpus`` GPUs of one node, as Ray packs fractions:
    a share below 1 never spans two GPUs."""
    shares = [roles.learner_gpus] * cluster.learner_processes + [roles.rollout_gpus] * cluster.num_rollout_workers \
        + [roles.reward_gpus] * cluster.num_reward_workers
    free = [1.0] * gpus
    for share in sorted(shares, reverse=True):
        if share >= 1:
            whole = [i for i, f in enumerate(free) if f == 1.0][:int(share)]
            if len(whole) < share:
                return False
            for i in whole:
                free[i] = 0.0
        else:
            slot = next((i for i, f in enumerate(free) if f >= share - 1e-9), None)
            if slot is None:
                return False
            free[slot] -= share
    return True


def test_no_gpu_puts_every_role_on_cpu():
    assert plan_roles(ClusterConfig(), [0.0]) == Roles(0.0, 1.0, 0.0, 0.0)


def test_one_gpu_is_shared_by_every_role():
    cluster = ClusterConfig()  # learner + 2 rollout actors + 1 reward actor
    roles = plan_roles(cluster, [1.0])
    assert roles.learner_gpus == roles.rollout_gpus == roles.reward_gpus == 0.25
    assert fits(roles, cluster, 1)


@pytest.mark.parametrize("gpus, rollouts, share", [(2, 2, 0.3333), (4, 2, 1.0), (4, 4, 0.5), (2, 1, 0.5)])
def test_several_gpus_give_the_learner_its_own(gpus: int, rollouts: int, share: float):
    cluster = ClusterConfig(num_rollout_workers=rollouts)
    roles = plan_roles(cluster, [float(gpus)])
    assert roles.learner_gpus == 1.0
    assert roles.rollout_gpus == roles.reward_gpus == share
    assert fits(roles, cluster, gpus)


@pytest.mark.parametrize("gpus", [1, 2])
def test_ranks_that_would_share_a_gpu_are_refused(gpus: int):
    cluster = ClusterConfig(learner_processes=2)
    with pytest.raises(PlacementError, match=rf"learner_processes=2 .* this machine has {gpus}: set "
                                             rf"--cluster.learner_processes {max(1, gpus - 1)}"):
        plan_roles(cluster, [float(gpus)])
    with pytest.raises(PlacementError, match=r"learner_gpus=0.5 .* needs a whole GPU"):
        plan_roles(ClusterConfig(learner_processes=2, learner_gpus=0.5), [4.0])


def test_ranks_get_a_gpu_each_where_there_are_enough():
    cluster = ClusterConfig(learner_processes=2)
    roles = plan_roles(cluster, [3.0])  # two for the ranks, one shared by 2 rollout + 1 reward actors
    assert roles.learner_gpus == 1.0 and roles.rollout_gpus == roles.reward_gpus == 0.3333
    assert fits(roles, cluster, 3)
    assert plan_roles(ClusterConfig(learner_processes=2, learner_gpus=0.0), [1.0]).learner_gpus == 0.0  # CPU ranks
    assert plan_roles(cluster, [0.0, 1.0, 1.0, 1.0]).learner_gpus == 1.0  # a cluster: a GPU per role


def test_multi_node_cluster_gets_one_gpu_per_role():
    roles = plan_roles(ClusterConfig(), [0.0, 1.0, 1.0])  # a CPU head and two GPU workers
    assert (roles.learner_gpus, roles.rollout_gpus, roles.reward_gpus) == (1.0, 1.0, 1.0)
    assert plan_roles(ClusterConfig(), [0.0, 0.0, 0.0]) == Roles(0.0, 1.0, 0.0, 0.0)


def test_explicit_settings_win():
    roles = plan_roles(ClusterConfig(learner_gpus=0.5, reward_gpus=0.0), [1.0])
    assert (roles.learner_gpus, roles.rollout_gpus, roles.reward_gpus) == (0.5, 0.25, 0.0)


def test_more_gpus_than_the_machine_has_is_one_line(ray_local):
    cfg = Config()
    cfg.cluster.learner_gpus = 1.0  # the session's Ray declares no GPU
    with pytest.raises(PlacementError, match=r"asks for 1 GPUs .* this machine has 0") as err:
        resolve_roles(cfg)
    assert "\n" not in str(err.value)


@pytest.mark.e2e
@pytest.mark.timeout(420)
def test_default_run_completes_on_a_one_gpu_machine(tmp_path: Path, policy_dir: Path, reward_dir: Path,
                                                    imdb_dir: Path):
    with started_cluster("rayg-", nodes=1, gpus_per_node=1) as c:
        cmd = [sys.executable, "-m", "learner.main", "--config", "configs/stand-in-quick.yaml",
               "--address", c.gcs_address, "--run.steps", "2", "--run.report_queries", "0",
               "--cluster.placement_timeout_s", "60", "--cluster.call_timeout_s", "120",
               # one learner rank: under NCCL each DDP rank needs a GPU of its own
               "--cluster.learner_processes", "1",
               "--out-dir", str(tmp_path), "--run.name", "one-gpu"]
        proc = subprocess.run(cmd, cwd=REPO, env=c.env, capture_output=True, text=True, timeout=360)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    actors = json.loads((tmp_path / "one-gpu" / "actors.json").read_text())
    assert {name: where["gpus"] for name, where in actors.items()} == {
        "learner": 0.25, "rollout-0": 0.25, "rollout-1": 0.25, "rewards-0": 0.25}
    assert re.search(r"plan: learner +on \S+ +0.25 GPU", out), out[-3000:]  # the plan is printed at start
    assert all(where["device"] == "cpu" for where in actors.values())  # torch sees no CUDA here
    assert len((tmp_path / "one-gpu" / "stats.jsonl").read_text().splitlines()) == 2


class _JoiningRank:
    """Stands for a learner rank in ``join_ranks``: rank 1 of the group dies while joining."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def rendezvous(self) -> tuple[str, int]:
        return "127.0.0.1", 0

    def join(self, address, timeout_s: float) -> None:
        import os
        import time

        if self.rank == 1:
            os._exit(1)
        time.sleep(timeout_s)  # rank 0 waits in the rendezvous for the rank that never comes

    def ping(self) -> int:
        return self.rank


def test_a_rank_that_dies_while_joining_fails_the_join_at_once_and_every_rank_goes(ray_local):
    import time

    from learner.orchestration.placement import join_ranks

    ray = ray_local
    ranks = [ray.remote(_JoiningRank).options(num_cpus=0, max_restarts=0).remote(r) for r in range(2)]
    t0 = time.monotonic()
    with pytest.raises(ray.exceptions.RayActorError):
        join_ranks(ranks, timeout_s=60)
    assert time.monotonic() - t0 < 30, "the join must not wait for rank 0's timeout"
    for rank in ranks:  # rank 0, left waiting, is killed too (it would hold its bundle)
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(rank.ping.remote(), timeout=30)
