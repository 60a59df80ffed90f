"""The cluster configs in cluster/ and a real multi-node run of the driver (issue "Run on a cluster").

1. Every YAML in ``cluster/`` passes Ray's own cluster-config validator (the steps ``ray up``
   runs before it contacts any cloud: ``prepare_config`` fills the provider's defaults,
   ``validate_config`` checks the result against ``ray-schema.json``), and a deliberately
   broken copy of each fails it. Every key carries a comment, and what the configs mount is
   what ``pip install -e ~/ppo`` needs.
2. A real Ray cluster of three nodes on this machine (``ray start`` subprocesses bound to
   127.0.0.1, each with its own ports, temp dir and custom resource), the project submitted
   with ``ray job submit --working-dir``, the rollout actors checked to run on different nodes.

Token authentication: the test cluster runs in token mode, as a real cluster should (Ray
2.60 turns it on by itself). A fresh random token is written to the test's temp dir and
every process of the test (``ray start`` of each node, ``ray job submit``, the driver the job
starts, which inherits the head's environment) finds it through ``RAY_AUTH_MODE=token`` and
``RAY_AUTH_TOKEN_PATH``; ``~/.ray/auth_token`` is neither read nor written, so the test
neither depends on nor disturbs the user's own token. ``RAY_AUTH_MODE=disabled`` would also
work but would test a set-up nobody should deploy, and would not show that the token reaches
a joining node and the job client. The test also checks that the dashboard API refuses a
request without the token.

Teardown never uses ``ray stop``: it kills every Ray process of the user on this machine,
other sessions' clusters included. Each node runs as ``ray start --block``, which kills the
processes it started when it gets SIGTERM; the finalizer sends that, then SIGKILLs by pid
whatever of the node's process tree (and of anything naming the test's temp dir) is left.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- local cluster

NODES = 3                         # head + 2 workers: SPREAD puts the learner and both rollout bundles on distinct nodes
CPUS_PER_NODE = 4                 # logical; room for the whole run on one node, so only SPREAD separates the rollouts
OBJECT_STORE_BYTES = 100 * 1024**2  # the default takes ~30% of RAM per node
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240
RUN_NAME = "cluster-e2e"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class LocalCluster:
    root: Path
    env: dict[str, str]
    token: str
    gcs_address: str = ""
    dashboard_url: str = ""
    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def get(self, path: str, token: str | None = "default", timeout: float = 10) -> dict:
        """GET on the dashboard API, with the cluster's token unless told otherwise."""
        req = urllib.request.Request(self.dashboard_url + path)
        token = self.token if token == "default" else token
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read().decode())

    def state(self, resource: str) -> list[dict]:
        """Ray's state API (what ``ray list nodes/actors`` reads), dead entries included."""
        return self.get(f"/api/v0/{resource}?limit=10000&detail=true&timeout=30", timeout=40)["data"]["result"]["result"]

    def start_node(self, name: str, head: bool) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager, gcs, dash, client = _free_ports(9)
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               f"--num-cpus={CPUS_PER_NODE}", "--num-gpus=0", f"--resources={json.dumps({name: 1})}",
               f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
               f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               "--min-worker-port=0", "--max-worker-port=0"]
        if head:
            cmd += ["--head", f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--ray-client-server-port={client}"]
            self.gcs_address, self.dashboard_url = f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"
        else:
            cmd += [f"--address={self.gcs_address}"]
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with log.open("w") as out:
            self.procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))

    def wait_for_nodes(self, n: int, deadline: float) -> list[dict]:
        last: object = None
        while time.monotonic() < deadline:
            for proc, log in zip(self.procs, self.logs):
                if proc.poll() is not None:
                    pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                alive = [nd for nd in self.state("nodes") if nd["state"] == "ALIVE"]
                if len(alive) == n:
                    return alive
                last = f"{len(alive)} nodes alive"
            except (urllib.error.URLError, OSError, KeyError, ValueError) as err:
                last = err
            time.sleep(1)
        pytest.fail(f"{n} nodes not up within {START_TIMEOUT_S}s (last: {last}); logs: {self.tail()}")

    def tail(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-2000:]}" for log in self.logs if log.exists())

    def teardown(self) -> None:
        for proc in reversed(self.procs):  # workers first, the head (GCS) last
            proc.send_signal(signal.SIGTERM)  # ray start --block then stops what it started
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
            # Each node runs in its own session (start_new_session): its group id is its pid.
            _kill(lambda: os.killpg(proc.pid, signal.SIGKILL))
            proc.wait(timeout=10)
        # Anything that left its node's group (a job driver runs in its own session) still
        # names this test's temp dir on its command line.
        for pid in _pids_naming(str(self.root)):
            _kill(lambda: os.kill(pid, signal.SIGKILL))
        shutil.rmtree(self.root, ignore_errors=True)


def _kill(send) -> None:
    try:
        send()
    except (ProcessLookupError, PermissionError):
        pass


def _pids_naming(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def local_cluster():
    # A short path: Ray puts Unix sockets under the temp dir and their paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="rayc-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cluster = LocalCluster(root=root, env=env, token=token)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        cluster.start_node("node-head", head=True)
        cluster.wait_for_nodes(1, deadline)
        for i in range(1, NODES):
            cluster.start_node(f"node-w{i}", head=False)
        cluster.wait_for_nodes(NODES, deadline)
        yield cluster
    finally:
        cluster.teardown()


@pytest.mark.e2e
def test_driver_runs_on_multi_node_cluster_with_spread(local_cluster: LocalCluster, policy_dir: Path,
                                                       reward_dir: Path, imdb_dir: Path):
    c = local_cluster
    # Token mode is really on: the dashboard API refuses requests without the token.
    with pytest.raises(urllib.error.HTTPError) as refused:
        c.get("/api/jobs/", token=None)
    assert refused.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as refused:
        c.get("/api/jobs/", token="not-the-token")
    assert refused.value.code == 403

    out_dir = c.root / "runs"
    runtime_env = {
        # Keep the upload small: the reference trainer's venv, old runs and git history stay home.
        "excludes": [".git", "runs", "benchmarks", "**/__pycache__", ".pytest_cache", "*.egg-info"],
        # No env_vars here: HF_HUB_OFFLINE reaches the driver from the head's environment, and the
        # driver's ray.init(runtime_env={"env_vars": ...}) refuses a job env that sets the same key.
    }
    submission_id = f"ppo-{secrets.token_hex(4)}"
    cmd = ["ray", "job", "submit", "--address", c.dashboard_url, "--submission-id", submission_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "learner.main", "--config", "configs/stand-in.yaml",
           # Ray copies the repo elsewhere: absolute paths, not stand-in.yaml's relative ones.
           "--policy", str(policy_dir), "--reward-model", str(reward_dir), "--dataset", str(imdb_dir),
           "--run.steps", "2", "--ppo.batch_size", "16", "--ppo.mini_batch_size", "16",
           "--cluster.num_rollout_workers", "2", "--cluster.placement_strategy", "SPREAD",
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

    # The run happened: two steps of statistics and a saved policy.
    run_dir = out_dir / RUN_NAME
    assert len((run_dir / "stats.jsonl").read_text().splitlines()) == 2, output[-3000:]
    assert (run_dir / "policy").is_dir()
    assert "tuned policy saved to" in output

    # Where the actors ran: the state API keeps dead actors with their node.
    nodes = {nd["node_id"]: nd for nd in c.state("nodes")}
    actors = [a for a in c.state("actors") if a.get("ray_namespace") == f"ppo-{RUN_NAME}"]
    by_name = {a["name"]: a for a in actors}
    assert {"learner", "rollout-0", "rollout-1", "rewards-0"} <= set(by_name), sorted(by_name)
    rollout_nodes = [by_name[f"rollout-{i}"]["node_id"] for i in range(2)]
    assert all(n in nodes for n in rollout_nodes)
    placed = {name: sorted(k for k in nodes[a["node_id"]]["resources_total"] if k.startswith("node-"))
              for name, a in by_name.items()}
    assert rollout_nodes[0] != rollout_nodes[1], f"SPREAD left both rollout actors on one node: {placed}"
