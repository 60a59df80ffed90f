"""A real Prometheus server for the tests: Debian's ``prometheus`` binary, started with the
command the README gives ("Watching a run"), pointed at the scrape config Ray writes into
its session folder, on a free loopback port with its own data folder.

The command is read from the README, so the README's instructions are the ones that run:
only the Ray temp dir (``/tmp/ray`` -> the test's RAY_TMPDIR), the port and the data folder
are replaced.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README_PORT = "127.0.0.1:9090"
README_DATA = "/tmp/prometheus-data"
README_RAY_DIR = "/tmp/ray"


def readme_command() -> list[str]:
    """The ``prometheus ...`` command of the README's bash block (continuation lines joined)."""
    text = (REPO / "README.md").read_text().replace("\\\n", " ")
    found = re.search(r"^prometheus --config\.file.*$", text, flags=re.MULTILINE)
    if not found:
        raise AssertionError("README.md has no 'prometheus --config.file ...' command")
    return shlex.split(found.group(0), comments=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """One Prometheus process; ``error`` says why there is none (not installed, did not start)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.command: list[str] = []
        self.error = "" if shutil.which("prometheus") else (
            "prometheus is not installed: apt-get install -y prometheus (Debian), see README 'Watching a run'")

    def start(self, ray_dir: Path, timeout: float = 60) -> None:
        """Run the README's command against Ray's session folder under ``ray_dir`` (RAY_TMPDIR/ray)."""
        if self.error:
            return
        config = ray_dir / "session_latest" / "metrics" / "prometheus" / "prometheus.yml"
        deadline = time.monotonic() + timeout
        while not config.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)  # the dashboard writes it when it starts
        if not config.is_file():
            self.error = f"Ray wrote no Prometheus config at {config}"
            return
        self.command = [arg.replace(README_RAY_DIR, str(ray_dir)).replace(README_PORT, f"127.0.0.1:{self.port}")
                        .replace(README_DATA, str(self.root / "data")) for arg in readme_command()]
        log = (self.root / "prometheus.log").open("w")
        self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        self.error = f"prometheus did not become ready: {self.log()[-2000:]}"

    def log(self) -> str:
        path = self.root / "prometheus.log"
        return path.read_text() if path.exists() else ""

    def api(self, path: str, **params: object) -> dict:
        """GET /api/v1/<path>; the reply's data (raises on an error status)."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=30) as resp:
            reply = json.loads(resp.read().decode())
        if reply.get("status") != "success":
            raise AssertionError(f"Prometheus /api/v1/{path} {params}: {reply}")
        return reply["data"]

    def query(self, expr: str, at: float) -> list[dict]:
        """Instant query (what /api/v1/query gives a dashboard's single value) at unix time ``at``."""
        return self.api("query", query=expr, time=f"{at:.3f}")["result"]

    def query_range(self, expr: str, start: float, end: float, step: float = 5) -> list[dict]:
        """What a Grafana time-series panel asks for."""
        return self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step:g}")["result"]

    def wait_for(self, names: tuple[str, ...], timeout: float) -> float:
        """The unix time at which an instant query finds samples of every metric in ``names``
        (0.0 if that does not happen within ``timeout``; ``error`` then says what was missing)."""
        deadline = time.monotonic() + timeout
        missing = list(names)
        while time.monotonic() < deadline:
            now = time.time()
            try:
                missing = [name for name in names if not self.query(name, at=now)]
            except (OSError, AssertionError, ValueError) as err:
                missing = [f"({err})"]
            if not missing:
                return now
            time.sleep(1)
        self.error = f"after {timeout:.0f}s Prometheus still had no samples of {missing}; targets: {self.targets()}"
        return 0.0

    def targets(self) -> list[tuple[str, str, str]]:
        """(address, health, last error) of each active target."""
        try:
            active = self.api("targets", state="active")["activeTargets"]
        except (OSError, AssertionError, KeyError, ValueError) as err:
            return [("?", "?", str(err))]
        return [(t["scrapeUrl"], t["health"], t.get("lastError", "")) for t in active]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
