"""Watching a run with the tools people use (README "Watching a run"), on the quick run of
conftest.py: a real Prometheus started with the README's command on Ray's scrape config,
the Grafana dashboard's every query against it, TensorBoard events read back with
tensorboard's reader, the W&B offline run folder, and the Ray dashboard's API with and
without the run's token. Only the missing-tracker check starts a process of its own."""
from __future__ import annotations

import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, DriverRun

DASHBOARD = REPO / "cluster" / "grafana" / "ppo-dashboard.json"
RATE_INTERVAL = "1m"  # Grafana's $__rate_interval for Ray's 10 s scrape interval and its default settings


def readme_metrics() -> dict[str, list[str]]:
    """metric -> its labels, from the table in the README's "Watching a run"."""
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Watching a run"):text.index("## What a run leaves")]
    out = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `ray_ppo") and len(cells) == 3:
            labels = [x.strip() for x in cells[1].split(",") if x.strip()]
            for name in re.findall(r"`(ray_ppo_\w+)`", cells[0]):
                out[name + ("_count" if "histogram" in cells[0] else "")] = labels
    return out


def live_prometheus(run: DriverRun):
    prom = run.prometheus
    if prom is None or prom.error or not run.live_at:
        why = prom.error if prom else "the fixture did not start one"
        pytest.fail(f"no Prometheus scraped the run: {why}\n{prom.log()[-2000:] if prom else ''}")
    return prom


# ----------------------------------------------------------------------------- Prometheus

@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_prometheus_ran_the_readme_command_on_rays_config(quick_run: DriverRun):
    prom = live_prometheus(quick_run)
    flags = prom.api("status/flags")
    assert flags["config.file"].endswith("/ray/session_latest/metrics/prometheus/prometheus.yml")
    assert flags["web.listen-address"] == f"127.0.0.1:{prom.port}"
    # What it scraped while the run was live (Ray's session, and so its targets, may be gone by
    # the time this test runs): Ray's file_sd job, its targets scraped.
    up = prom.query("up", at=quick_run.live_at)
    assert up and {s["metric"]["job"] for s in up} == {"ray"}, up
    assert any(float(s["value"][1]) == 1.0 for s in up), up


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_prometheus_has_every_readme_metric_with_the_runs_labels(quick_run: DriverRun):
    prom = live_prometheus(quick_run)
    table = readme_metrics()
    assert len(table) >= 14 and "ray_ppo_reward_batch_size_count" in table, table
    for name, labels in table.items():
        series = prom.query(name, at=quick_run.live_at)
        assert series, f"{name}: no samples in Prometheus at the run's live moment"
        for label in labels:
            assert all(label in s["metric"] for s in series), f"{name}: label {label!r} missing: {series}"
        if "run" in labels:
            assert {s["metric"]["run"] for s in series} == {"quick"}, name
    lag = prom.query("ray_ppo_weight_version_lag", at=quick_run.live_at)
    assert {s["metric"]["actor"] for s in lag} == {"rollout-0", "rollout-1"}
    phases = {s["metric"]["phase"] for s in prom.query("ray_ppo_phase_seconds", at=quick_run.live_at)}
    assert phases >= {"broadcast", "generate", "score", "rollout", "update", "step"}
    (beta,) = prom.query('ray_ppo_kl_coef{run="quick"}', at=quick_run.live_at)
    assert 0.04 < float(beta["value"][1]) < 0.06  # the quick config's init_kl_coef, barely moved


# ----------------------------------------------------------------------------- Grafana

def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of every panel, as Grafana would send it for run 'quick'."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", RATE_INTERVAL).replace("$run", "quick")
            out.append((panel["title"], expr))
    return out


def test_dashboard_json_is_a_grafana_dashboard_on_rays_data_source():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert "label_values(ray_ppo_step, run)" in json.dumps(variables["run"]["query"])
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel["title"]
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for want in ("reward", "kl", "beta", "policy and value loss", "clip", "phase", "samples per second",
                 "weight version lag", "reward forward pass"):
        assert want in titles, want
    queries = " ".join(q for _, q in panel_queries())
    for name in readme_metrics():
        if name not in ("ray_ppo_tokens_per_second",):
            assert name.removesuffix("_count") in queries, f"no panel shows {name}"


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
@pytest.mark.parametrize("title,expr", panel_queries(), ids=lambda v: v if len(v) < 40 else None)
def test_every_grafana_panel_query_returns_data(quick_run: DriverRun, title: str, expr: str):
    prom = live_prometheus(quick_run)
    series = prom.query_range(expr, start=quick_run.started_at, end=quick_run.ended_at)
    values = [float(v) for s in series for _, v in s["values"]]
    assert values and any(math.isfinite(v) for v in values), f"panel {title!r} would stay empty: {expr}"


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_readme_grafana_steps_match_rays_provisioning(quick_run: DriverRun):
    """The README copies the dashboard into the folder Ray's provisioning loads Ray's own
    dashboards from, and Ray provisions the Prometheus data source the dashboard picks."""
    metrics = quick_run.ray_metrics_dir
    assert metrics is not None and metrics.is_dir()
    provider = yaml.safe_load(next((metrics / "grafana" / "provisioning" / "dashboards").glob("*.yml")).read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert folder.endswith("/metrics/grafana/dashboards"), folder
    readme = (REPO / "README.md").read_text()
    assert "cp cluster/grafana/ppo-dashboard.json /tmp/ray/session_latest/metrics/grafana/dashboards/" in readme
    assert (metrics / "grafana" / "dashboards" / "default_grafana_dashboard.json").is_file()  # Ray's, beside ours
    sources = yaml.safe_load(next((metrics / "grafana" / "provisioning" / "datasources").glob("*.yml")).read_text())
    assert [d["type"] for d in sources["datasources"]] == ["prometheus"]
    assert "--config /tmp/ray/session_latest/metrics/grafana/grafana.ini" in readme
    assert (metrics / "grafana" / "grafana.ini").is_file()


# ----------------------------------------------------------------------------- trackers

def numeric(stats: dict) -> dict[str, float]:
    return {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_tensorboard_events_hold_every_statistic_and_the_reward_histogram(quick_run: DriverRun):
    from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, SCALARS, EventAccumulator

    acc = EventAccumulator(str(quick_run.run_dir / "tensorboard"), size_guidance={SCALARS: 0, HISTOGRAMS: 0})
    acc.Reload()
    stats = quick_run.stats()
    keys = set().union(*(numeric(s) for s in stats))
    assert keys <= set(acc.Tags()["scalars"]), keys - set(acc.Tags()["scalars"])
    for key in keys:
        got = {e.step: e.value for e in acc.Scalars(key)}
        want = {s["step"]: numeric(s)[key] for s in stats if key in s}
        assert got.keys() == want.keys(), key
        for step, value in want.items():
            assert got[step] == pytest.approx(value, rel=1e-6, abs=1e-6), (key, step)
    hist = acc.Histograms("env/rewards")
    rollouts = [json.loads(line) for line in (quick_run.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [h.step for h in hist] == [r["step"] for r in rollouts]
    for h, r in zip(hist, rollouts):
        assert h.histogram_value.num == len(r["scores"]) == 64
        assert h.histogram_value.min == pytest.approx(min(r["scores"]), abs=1e-6)
        assert h.histogram_value.sum == pytest.approx(sum(r["scores"]), abs=1e-4)


def wandb_records(path: Path):
    """The records of a W&B run file (.wandb): LevelDB-log framing, 32 KiB blocks, each record
    a wandb_internal_pb2.Record. wandb 0.31 has no Python reader of its own (its core is in Go)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    pos, parts = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):
            pos += left  # block trailer / padding
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record


@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_wandb_offline_run_holds_the_config_and_every_steps_statistics(quick_run: DriverRun):
    try:
        import wandb  # noqa: F401
    except ImportError:
        pytest.skip("wandb is not installed (optional: pip install -e '.[wandb]'); the quick run logged no W&B run")
    files = list((quick_run.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    config, history = {}, {}
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config = {i.key: json.loads(i.value_json) for i in record.run.config.update if i.key != "_wandb"}
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history[row["_step"]] = row
    assert config == yaml.safe_load((quick_run.run_dir / "config.yaml").read_text())
    stats = quick_run.stats()
    assert sorted(history) == [s["step"] for s in stats]
    for s in stats:
        row = history[s["step"]]
        for key, value in numeric(s).items():
            assert row[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (key, s["step"])
        assert row["env/rewards/_type"] == "histogram"


def test_unknown_tracker_is_a_settings_error():
    from learner.config import ConfigError
    from learner.records.trackers import check_trackers, parse_trackers

    assert parse_trackers("tensorboard") == ["jsonl", "tensorboard"]
    assert check_trackers("jsonl") == ["jsonl"]
    with pytest.raises(ConfigError, match=r"run.trackers: unknown tracker 'tensorbord' \(choose from jsonl, "):
        parse_trackers("jsonl,tensorbord")


@pytest.mark.timeout(120)
def test_missing_tracker_package_stops_the_run_at_start_with_one_line(tmp_path: Path):
    """The real entry point, with wandb made unimportable: exit 2, one line, before Ray starts."""
    code = ("import sys; sys.modules['wandb'] = None; from learner.main import main; "
            f"sys.exit(main(['--config', 'configs/stand-in-quick.yaml', '--run.trackers', 'jsonl,wandb', "
            f"'--out-dir', {str(tmp_path)!r}, '--run.name', 'nowandb']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110,
                          check=False, env={**os.environ, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "warning"))]
    assert errors == [("error: run.trackers: 'wandb' needs the wandb package, which is not installed: "
                       "pip install -e '.[wandb]'")], proc.stderr
    assert "Ray dashboard" not in proc.stdout and not (tmp_path / "nowandb").exists()


# ----------------------------------------------------------------------------- Ray dashboard

@pytest.mark.e2e
@pytest.mark.timeout(900)  # the first test to ask for quick_run waits for its run
def test_dashboard_api_lists_the_named_actors_with_the_token_and_refuses_without(quick_run: DriverRun):
    seen = quick_run.dashboard
    assert seen.get("status") == 200, seen
    alive = {a["name"]: a["class_name"] for a in seen["actors"] if a["state"] == "ALIVE"}
    assert alive == {"learner": "LearnerActor", "learner-rank1": "LearnerActor",  # the quick config's 2 DDP ranks
                     "rollout-0": "RolloutWorker", "rollout-1": "RolloutWorker", "rewards-0": "RewardServer"}, alive
    assert {a["ray_namespace"] for a in seen["actors"]} == {"ppo-quick"}
    assert seen["status_without_token"] == 401
    assert seen["status_wrong_token"] == 403


def test_readme_shows_the_dashboard_screenshots():
    """The PNGs docs/take_screenshots.py saved from a real run are in docs/ and the README shows them."""
    section = (REPO / "README.md").read_text().split("## Watching a run")[1].split("## What a run leaves")[0]
    shown = re.findall(r"!\[[^\]]*\]\((docs/dashboard-[\w-]+\.png)\)", section)
    assert {"docs/dashboard-token.png", "docs/dashboard-actors.png", "docs/dashboard-jobs.png",
            "docs/dashboard-job.png"} <= set(shown), shown
    for path in shown + ["docs/dashboard-overview.png"]:
        data = (REPO / path).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000, path
    script = subprocess.run([sys.executable, "docs/take_screenshots.py", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=False)
    assert script.returncode == 0 and "--out" in script.stdout
