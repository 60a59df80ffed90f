"""Screenshots of the Ray dashboard of a real run, for the README ("Watching a run").

What it does, as a user would:

1. starts a one-node Ray cluster on 127.0.0.1 in token mode with a fresh token
   (tests/localcluster.py: its own temp dir, ports and token; ``~/.ray`` is not touched);
2. submits a short run of the stand-ins with ``ray job submit`` (the quick config, 2 rollout
   actors, more steps so that it is still running while the pages are taken);
3. opens the dashboard in headless Chromium (Debian's ``chromium``) with a fresh profile,
   types the token into the dashboard's "Authentication Token Required" dialog and presses
   Enter (the page posts it to ``/api/authenticate``, which sets the token cookie);
4. saves the pages as PNGs: the token dialog, Overview, Jobs, the run's job page, Actors
   (``learner``, ``rollout-0``, ``rollout-1``, ``rewards-0``);
5. stops the job and the cluster.

Chromium is driven through its DevTools protocol (``--remote-debugging-port``) with aiohttp,
which Ray already installs. About 3 minutes on 2 CPU cores.

    python docs/take_screenshots.py            # PNGs into docs/
    python docs/take_screenshots.py --out /tmp/shots --steps 40
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SHARED_DIR", REPO.parent / "shared")).resolve()
sys.path.insert(0, str(REPO / "tests"))  # the tests' local cluster helper
# `ray` (the CLI) and the job's `python` are this interpreter's, venv activated or not.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
ACTORS = ("learner", "rollout-0", "rollout-1", "rewards-0")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Start a short run under `ray job submit` on a local token-mode Ray "
                                "cluster and save screenshots of its Ray dashboard (headless Chromium).")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="folder for the PNGs (default: docs/)")
    p.add_argument("--steps", type=int, default=30, help="PPO steps of the run (it must outlast the screenshots)")
    p.add_argument("--chromium", default=shutil.which("chromium") or "chromium", help="Chromium binary")
    p.add_argument("--width", type=int, default=1440)
    p.add_argument("--height", type=int, default=900)
    return p.parse_args(argv)


def submit(cluster, steps: int, out_dir: Path) -> str:
    """``ray job submit --no-wait`` of a short stand-in run; returns its submission id."""
    job_id = f"ppo-screenshots-{int(time.time())}"
    runtime_env = {"excludes": [".git", "runs", "benchmarks", "**/__pycache__", ".pytest_cache", "*.egg-info"],
                   "env_vars": {"HF_HUB_OFFLINE": "1"}}
    cmd = ["ray", "job", "submit", "--no-wait", "--address", cluster.dashboard_url, "--submission-id", job_id,
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
           "python", "-m", "learner.main", "--config", "configs/stand-in-quick.yaml",
           "--policy", str(SHARED / "models" / "gpt2-imdb-mini"),
           "--reward-model", str(SHARED / "models" / "distilbert-imdb-mini"), "--dataset", str(SHARED / "data" / "imdb"),
           "--cluster.num_rollout_workers", "2", "--run.steps", str(steps), "--run.report_queries", "0",
           "--run.name", "dashboard", "--out-dir", str(out_dir)]
    subprocess.run(cmd, env=cluster.env, cwd=REPO, check=True, capture_output=True, text=True, timeout=120)
    return job_id


def wait_for_actors(cluster, job_id: str, timeout: float = 300) -> None:
    """Until the run's named actors are alive and it has logged two steps."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = cluster.get(f"/api/jobs/{job_id}")["status"]
        if status in ("FAILED", "STOPPED", "SUCCEEDED"):
            raise SystemExit(f"the job ended ({status}) before the screenshots:\n"
                             f"{cluster.get(f'/api/jobs/{job_id}/logs')['logs'][-3000:]}")
        alive = {a["name"] for a in cluster.state("actors") if a["state"] == "ALIVE"}
        logs = cluster.get(f"/api/jobs/{job_id}/logs")["logs"]
        if set(ACTORS) <= alive and "step 2/" in logs:
            return
        time.sleep(3)
    raise SystemExit(f"actors {ACTORS} not alive within {timeout:.0f}s")


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.ids = itertools.count(1)

    async def call(self, method: str, **params) -> dict:
        msg_id = next(self.ids)
        await self.ws.send_json({"id": msg_id, "method": method, "params": params})
        while True:
            reply = await self.ws.receive_json(timeout=60)
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    async def js(self, expression: str):
        reply = await self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return reply.get("result", {}).get("value")

    async def wait_for(self, expression: str, what: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.js(f"!!({expression})"):
                return
            await asyncio.sleep(0.5)
        text = await self.js("document.body ? document.body.innerText.slice(0, 1500) : ''")
        raise SystemExit(f"the page did not show {what} within {timeout:.0f}s; it shows:\n{text}")

    async def goto(self, url: str) -> None:
        await self.call("Page.navigate", url=url)

    async def shot(self, path: Path, settle: float = 4) -> None:
        await asyncio.sleep(settle)  # tables fill in after their first request; let them
        data = (await self.call("Page.captureScreenshot", format="png"))["data"]
        path.write_bytes(base64.b64decode(data))
        print(f"saved {path.relative_to(REPO) if path.is_relative_to(REPO) else path}", flush=True)


def body_has(*texts: str) -> str:
    return " && ".join(f"document.body && document.body.innerText.includes({json.dumps(t)})" for t in texts)


async def take(port: int, url: str, token: str, job_id: str, out: Path, size: tuple[int, int]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
            target = await resp.json()
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                            deviceScaleFactor=1, mobile=False)
            # A fresh profile has no token cookie: the dashboard asks for the token.
            await page.goto(url + "/#/overview")
            field = 'document.querySelector(\'input[placeholder="Enter your authentication token"]\')'
            await page.wait_for(field, "the token dialog")
            await page.shot(out / "dashboard-token.png", settle=1)
            # Type it and press Enter, as a user pasting `ray get-auth-token`'s output would.
            await page.js(f"{field}.focus()")
            await page.call("Input.insertText", text=token)
            for kind in ("keyDown", "keyUp"):
                await page.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                                windowsVirtualKeyCode=13, nativeVirtualKeyCode=13)
            await page.wait_for(f"!{field} && " + body_has("Cluster status"), "the overview after the token")
            await page.shot(out / "dashboard-overview.png")
            await page.goto(url + "/#/jobs")
            await page.wait_for(body_has(job_id), "the job in the Jobs view")
            await page.shot(out / "dashboard-jobs.png")
            await page.goto(url + f"/#/jobs/{job_id}")
            await page.wait_for(body_has(job_id, "python -m learner.main", "step 2/"), "the job page with its log")
            # Taller, so that the driver's log with its step lines is in the picture.
            await page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1] + 500,
                            deviceScaleFactor=1, mobile=False)
            await page.shot(out / "dashboard-job.png")
            await page.call("Emulation.setDeviceMetricsOverride", width=size[0], height=size[1],
                            deviceScaleFactor=1, mobile=False)
            await page.goto(url + "/#/actors")
            await page.wait_for(body_has(*ACTORS), "the named actors")
            await page.shot(out / "dashboard-actors.png")


def screenshots(args: argparse.Namespace, url: str, token: str, job_id: str) -> None:
    from localcluster import _free_ports

    (port,) = _free_ports(1)
    profile = Path(tempfile.mkdtemp(prefix="chromium-"))
    chromium = subprocess.Popen([args.chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                                 f"--remote-debugging-port={port}", "--remote-debugging-address=127.0.0.1",
                                 "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/json/version", timeout=2).close()
                break
            except OSError:
                time.sleep(0.5)
        args.out.mkdir(parents=True, exist_ok=True)
        asyncio.run(take(port, url, token, job_id, args.out, (args.width, args.height)))
    finally:
        chromium.terminate()
        chromium.wait(timeout=20)
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not shutil.which(args.chromium):
        print(f"error: no Chromium at '{args.chromium}' (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    from localcluster import started_cluster

    with started_cluster(prefix="rayshot-", nodes=1) as cluster:
        job_id = submit(cluster, args.steps, cluster.root / "runs")
        print(f"submitted {job_id} to {cluster.dashboard_url}", flush=True)
        try:
            wait_for_actors(cluster, job_id)
            screenshots(args, cluster.dashboard_url, cluster.token, job_id)
        finally:
            subprocess.run(["ray", "job", "stop", "--address", cluster.dashboard_url, job_id], env=cluster.env,
                           capture_output=True, timeout=60, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
