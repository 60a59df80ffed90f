"""Real Ray nodes on this machine for the tests (and benchmarks/scaling.py): ``ray start``
subprocesses bound to 127.0.0.1, each with its own free ports, temp dir, logical CPUs (and
optionally logical GPUs) and a custom resource naming it, all sharing one fresh token.

Teardown never uses ``ray stop``: it stops every Ray process of the user on the machine,
other sessions' clusters included. Each node runs as ``ray start --block`` in its own
session; SIGTERM makes it stop what it started, then the node's process group and any
process left whose command line or environment names the temp dir are SIGKILLed (all of
the cluster's processes inherit ``RAY_AUTH_TOKEN_PATH``, a file in it).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import typing
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CPUS_PER_NODE = 4                 # logical; room for the whole run on one node, so only SPREAD separates the rollouts
OBJECT_STORE_BYTES = 100 * 1024**2  # the default takes ~30% of RAM per node
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240


def _free_ports(n: int) -> list[int]:
    """n distinct ports free right now (held open together so none repeats)."""
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
    """Ray nodes started with ``ray start --block`` on 127.0.0.1, all sharing one token."""

    root: Path
    env: dict[str, str]
    token: str
    gpus: int = 0
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
        reply = self.get(f"/api/v0/{resource}?limit=10000&detail=true&timeout=30", timeout=40)
        return reply["data"]["result"]["result"]

    def start_node(self, name: str, head: bool) -> None:
        temp_dir = self.root / name
        temp_dir.mkdir()
        agent_http, agent_grpc, runtime_env, metrics, node_manager, object_manager, gcs, dash, client = _free_ports(9)
        cmd = ["ray", "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
               f"--num-cpus={CPUS_PER_NODE}", f"--num-gpus={self.gpus}", f"--resources={json.dumps({name: 1})}",
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
        """Until the head's state API lists n live nodes; fails on a dead ``ray start`` or the deadline."""
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
        # Anything that left its node's group (workers and job drivers start their own
        # sessions) still names this test's temp dir.
        for pid in _pids_naming(str(self.root)):
            _kill(lambda: os.kill(pid, signal.SIGKILL))
        shutil.rmtree(self.root, ignore_errors=True)


def _kill(send: typing.Callable[[], None]) -> None:
    try:
        send()
    except (ProcessLookupError, PermissionError):
        pass


def _pids_naming(text: str) -> list[int]:
    """Processes whose command line or environment holds text (every process of the test
    cluster inherits RAY_AUTH_TOKEN_PATH, a file in the test's temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if any(text.encode() in (entry / name).read_bytes() for name in ("cmdline", "environ")):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextlib.contextmanager
def started_cluster(prefix: str = "rayc-", nodes: int = 3, gpus_per_node: int = 0) -> typing.Iterator[LocalCluster]:
    """``nodes`` token-protected Ray nodes on 127.0.0.1, each declaring ``gpus_per_node`` logical
    GPUs (Ray schedules them; torch sees none, so the actors still compute on CPU), torn down
    on exit (also used by benchmarks/scaling.py)."""
    # A short path: Ray puts Unix sockets under the temp dir and their paths are limited to 107 bytes.
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = root / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    cluster = LocalCluster(root=root, env=env, token=token, gpus=gpus_per_node)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        cluster.start_node("node-head", head=True)
        cluster.wait_for_nodes(1, deadline)
        for i in range(1, nodes):
            cluster.start_node(f"node-w{i}", head=False)
        cluster.wait_for_nodes(nodes, deadline)
        yield cluster
    finally:
        cluster.teardown()
