"""The cluster configs in cluster/ and a real multi-node run of the driver (issue "Run on a cluster").

1. Every YAML in ``cluster/`` passes Ray's own cluster-config checks (what ``ray up`` runs
   before it contacts any machine: ``prepare_config`` fills the provider's defaults,
   ``validate_config`` checks the result against ``ray-schema.json``), and a deliberately
   broken copy of each fails them. Every key carries a comment; the repository is mounted at
   ``~/ppo`` and installed from there; every node gets the token and starts in token mode.
2. A real three-node Ray cluster on this machine: ``ray start`` subprocesses bound to
   127.0.0.1, each with its own free ports, temp dir, 4 logical CPUs and a custom resource
   naming it. The project goes in with ``ray job submit --working-dir`` (two PPO steps on the
   stand-ins, ``--cluster.placement_strategy SPREAD``); the test checks the job SUCCEEDED,
   the run directory, and, through Ray's state API, that ``rollout-0`` and ``rollout-1`` ran
   on different nodes. Each node could hold the whole run, so only SPREAD separates them
   (with PACK all four actors land on one node); three nodes because SPREAD gives the first
   bundles (learner, rollout-0, rollout-1) distinct nodes and only then reuses nodes.

Token authentication: the test cluster runs in token mode, as a real cluster should (Ray
2.60 turns it on by itself). A fresh random token is written to the test's temp dir, and
every process of the test (``ray start`` of each node, ``ray job submit``, the driver the job
starts, which inherits the head's environment) finds it through ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH``; ``~/.ray/auth_token`` is neither read nor written, so the test
neither depends on nor disturbs the user's own token. ``RAY_AUTH_MODE=disabled`` would also
work, but it would test a set-up nobody should deploy (Ray's GCS listens on every interface,
not only 127.0.0.1) and would not show that the token reaches a joining node, the driver and
the job client. The test also checks that the dashboard API refuses requests without the
token or with a wrong one, and that the README's other way to pass it (``--headers``) works.

Teardown never uses ``ray stop``: it stops every Ray process of the user on the machine,
other sessions' clusters included. Each node runs as ``ray start --block`` in its own
session; SIGTERM makes it stop what it started, then the finalizer SIGKILLs the node's
process group and any process left whose command line or environment names the test's temp
dir (all of the test cluster's processes inherit ``RAY_AUTH_TOKEN_PATH``).
"""
from __future__ import annotations

import copy
import json
import re
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from localcluster import JOB_TIMEOUT_S, LocalCluster, started_cluster

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "cluster").glob("*.yaml"))


# ----------------------------------------------------------------------------- cluster configs

def ray_up_checks(config: dict) -> dict:
    """What ``ray up`` does to a config before it contacts any provider (commands.py
    ``_bootstrap_config``): fill the provider's defaults, merge the setup commands, check
    Docker settings and worker counts (``prepare_config``), then check the result against
    Ray's JSON schema (``validate_config``). Offline: the defaults are files in the package."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def uncommented_keys(text: str) -> list[str]:
    """Lines holding a YAML key with neither a comment line just above nor a comment after it."""
    missing, previous, block_indent = [], "", None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if block_indent is not None and indent > block_indent:
            continue  # inside a block scalar (| or >)
        block_indent = None
        key = re.match(r"^\s*(?:-\s+)?[^\s#:][^:#]*?:(?:\s|$)", line)
        if key and not stripped.startswith("#"):
            if not (previous.startswith("#") or " #" in line):
                missing.append(f"{number}: {stripped}")
            if re.search(r":\s*[|>][-+]?\s*(#.*)?$", line):
                block_indent = indent
        previous = stripped
    return missing


def test_both_cluster_configs_exist():
    assert {p.name for p in CONFIGS} >= {"aws-gpu.yaml", "local-machines.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_rays_validator_and_sets_up_the_project(path: Path):
    prepared = ray_up_checks(yaml.safe_load(path.read_text()))

    # The token reaches every node, and every node starts Ray in token mode.
    mounts = prepared["file_mounts"]
    assert mounts.get("~/.ray/auth_token") == "~/.ray/auth_token"
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [cmd for cmd in prepared[kind] if "ray start" in cmd]
        assert starts and all("RAY_AUTH_MODE=token ray start" in cmd for cmd in starts), kind
    # Only `ray dashboard`'s SSH tunnel reaches the dashboard.
    assert "--dashboard-host=127.0.0.1" in " ".join(prepared["head_start_ray_commands"])

    # The repository is mounted at ~/ppo and installed from there, torch first (so pip does
    # not pick a torch build for the project), on the head and on the workers.
    assert (REPO / mounts["~/ppo"]).resolve() == REPO
    for kind in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged in
        commands = prepared[kind]
        install = [i for i, cmd in enumerate(commands) if "pip install -e ~/ppo" in cmd]
        torch = [i for i, cmd in enumerate(commands) if re.search(r"pip install .*torch", cmd)]
        assert install and torch and torch[0] < install[0], (kind, commands)


def test_aws_config_autoscales_gpu_workers_from_zero():
    prepared = ray_up_checks(yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text()))
    types = prepared["available_node_types"]
    head = types[prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert len(gpu) == 1 and gpu[0]["min_workers"] == 0 and gpu[0]["max_workers"] >= 4
    assert prepared["max_workers"] >= gpu[0]["max_workers"]
    worker_setup = " ".join(prepared["worker_setup_commands"])
    assert "download.pytorch.org/whl/cpu" not in worker_setup  # the CUDA build on GPU nodes


def test_local_config_lists_its_machines():
    prepared = ray_up_checks(yaml.safe_load((REPO / "cluster" / "local-machines.yaml").read_text()))
    provider = prepared["provider"]
    assert provider["type"] == "local" and provider["head_ip"] and provider["worker_ips"]
    workers = prepared["available_node_types"]["local.cluster.node"]
    assert workers["min_workers"] == workers["max_workers"] == len(provider["worker_ips"])


# A deliberately broken copy of each file must fail the same checks: a misspelled key and a
# value of the wrong type at the top level, and a misspelled key inside a node type.
BREAKAGES = [(path, *breakage) for path in CONFIGS for breakage in [
    ("misspelled key", r"^setup_commands:", "setup_comands:", "'setup_comands' was unexpected"),
    ("wrong type", r"^idle_timeout_minutes: .*$", "idle_timeout_minutes: ten", "'ten' is not of type 'number'"),
]] + [(REPO / "cluster" / "aws-gpu.yaml", "misspelled node type key", r"^(\s+)min_workers: 0",
       r"\1min_worker: 0", "'min_worker' was unexpected")]


@pytest.mark.parametrize("path, what, pattern, replacement, message", BREAKAGES,
                         ids=[f"{b[0].name}-{b[1].replace(' ', '-')}" for b in BREAKAGES])
def test_validator_rejects_a_broken_copy(tmp_path: Path, path: Path, what: str, pattern: str,
                                         replacement: str, message: str):
    import jsonschema

    broken_text, n = re.subn(pattern, replacement, path.read_text(), count=1, flags=re.M)
    assert n == 1, f"{path.name} has no line matching {pattern!r}"
    broken = tmp_path / path.name
    broken.write_text(broken_text)
    with pytest.raises(jsonschema.ValidationError) as err:
        ray_up_checks(yaml.safe_load(broken.read_text()))
    assert message in str(err.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_key_is_commented(path: Path):
    assert uncommented_keys(path.read_text()) == []


def test_comment_check_finds_a_bare_key():
    text = "# the name\nname: x\nprovider:  # where\n  type: local\nrun: |\n  a: b\n"
    assert uncommented_keys(text) == ["4: type: local", "5: run: |"]  # not "a: b", the block's text


# ----------------------------------------------------------------------------- local cluster

NODES = 3                         # head + 2 workers: SPREAD puts the learner and both rollout bundles on distinct nodes
RUN_NAME = "cluster-e2e"


@pytest.fixture
def local_cluster():
    with started_cluster(nodes=NODES) as cluster:
        yield cluster


def assert_dashboard_needs_the_token(c: LocalCluster) -> None:
    """Token mode is really on: the dashboard API refuses requests without the token or with a wrong one."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        c.get("/api/jobs/", token=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as refused:
        c.get("/api/jobs/", token="not-the-token")
    assert refused.value.code == 403


def submit_run(c: LocalCluster, policy_dir: Path, reward_dir: Path, imdb_dir: Path, out_dir: Path) -> tuple[str, str]:
    """Two PPO steps on the stand-ins with SPREAD, through ``ray job submit --working-dir``; checks
    the job SUCCEEDED and returns its submission id and the client's output."""
    runtime_env = {
        # Keep the upload small: the reference trainer's venv, old runs and git history stay home.
        "excludes": [".git", "runs", "benchmarks", "**/__pycache__", ".pytest_cache", "*.egg-info"],
        # The job sets HF_HUB_OFFLINE too: the driver must not pass a second value for the same
        # key to ray.init (Ray refuses to merge them).
        "env_vars": {"HF_HUB_OFFLINE": "1"},
    }
    submission_id = f"ppo-{secrets.token_hex(4)}"
    cmd = ["ray", "job", "submit", "--address", c.dashboard_url, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "learner.main", "--config", "configs/stand-in.yaml",
           # Ray copies the repo elsewhere: absolute paths, not stand-in.yaml's relative ones.
           "--policy", str(policy_dir), "--reward-model", str(reward_dir), "--dataset", str(imdb_dir),
           "--run.steps", "2", "--ppo.batch_size", "16", "--ppo.mini_batch_size", "16",
           # one learner bundle (stand-in.yaml has 2 DDP ranks): SPREAD's first three bundles are
           # then the learner and both rollout actors, on the three nodes
           "--cluster.num_rollout_workers", "2", "--cluster.learner_processes", "1",
           "--cluster.placement_strategy", "SPREAD",
           "--cluster.placement_timeout_s", "60", "--cluster.call_timeout_s", "120",
           "--run.name", RUN_NAME, "--out-dir", str(out_dir)]
    t0 = time.monotonic()
    try:
        submit = subprocess.run(cmd, env=c.env, cwd=REPO, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"job not finished within {JOB_TIMEOUT_S}s:\n{err.stdout}\n{err.stderr}")
    output = submit.stdout + submit.stderr
    status = c.get(f"/api/jobs/{submission_id}")
    assert status["status"] == "SUCCEEDED", f"job {status['status']}: {status.get('message')}\n{output[-6000:]}"
    print(f"job took {time.monotonic() - t0:.0f}s")
    print("\n".join(ln for ln in output.splitlines() if ln.startswith(("Ray dashboard", "step "))))
    return submission_id, output


def assert_header_token_works(c: LocalCluster, submission_id: str) -> None:
    """cluster/README.md's other way to pass the token: a header, with token mode off locally."""
    plain_env = {k: v for k, v in c.env.items() if not k.startswith("RAY_AUTH_")}
    plain_env["RAY_AUTH_MODE"] = "disabled"
    headers = json.dumps({"Authorization": f"Bearer {c.token}"})
    job_status = subprocess.run(["ray", "job", "status", submission_id, "--address", c.dashboard_url,
                                 "--headers", headers], env=plain_env, capture_output=True, text=True, timeout=60)
    assert job_status.returncode == 0 and f"Job '{submission_id}' succeeded" in job_status.stdout, (
        job_status.stdout + job_status.stderr)


def assert_rollouts_on_distinct_nodes(c: LocalCluster) -> None:
    """Where the actors ran: the state API keeps dead actors with their node."""
    nodes = {nd["node_id"]: nd for nd in c.state("nodes")}
    actors = [a for a in c.state("actors") if a.get("ray_namespace") == f"ppo-{RUN_NAME}"]
    by_name = {a["name"]: a for a in actors}
    assert {"learner", "rollout-0", "rollout-1", "rewards-0"} <= set(by_name), sorted(by_name)
    rollout_nodes = [by_name[f"rollout-{i}"]["node_id"] for i in range(2)]
    assert all(n in nodes for n in rollout_nodes)
    placed = {name: sorted(k for k in nodes[a["node_id"]]["resources_total"] if k.startswith("node-"))
              for name, a in by_name.items()}
    print(f"actors on nodes: {placed}")
    assert rollout_nodes[0] != rollout_nodes[1], f"SPREAD left both rollout actors on one node: {placed}"


@pytest.mark.e2e
def test_driver_runs_on_multi_node_cluster_with_spread(local_cluster: LocalCluster, policy_dir: Path,
                                                       reward_dir: Path, imdb_dir: Path):
    c = local_cluster
    assert_dashboard_needs_the_token(c)
    out_dir = c.root / "runs"
    submission_id, output = submit_run(c, policy_dir, reward_dir, imdb_dir, out_dir)
    assert_header_token_works(c, submission_id)

    # The run happened: two steps of statistics and a saved policy.
    run_dir = out_dir / RUN_NAME
    assert len((run_dir / "stats.jsonl").read_text().splitlines()) == 2, output[-3000:]
    assert (run_dir / "policy").is_dir()
    assert "tuned policy saved to" in output

    assert_rollouts_on_distinct_nodes(c)
