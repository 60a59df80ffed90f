"""The benchmark scripts' arithmetic, on made-up runs: what BENCHMARKS.md reports must be what
the runs measured. (Their subprocess runs are not repeated here: they take minutes and the
reference trainer needs its own virtual environment.)"""
from __future__ import annotations

import importlib.util
import sys

import pytest

from conftest import REPO


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


compare = _load("compare")
phases = _load("phases")


def _run(trainer: str, seed: int, step_s: float, rewards: list[float], held_out: float) -> "compare.RunResult":
    rows = [{"time/step": step_s, "time/generate": 0.2 * step_s, "time/score": 0.1 * step_s,
             "time/update": 0.6 * step_s, "env/reward_mean": r} for r in rewards]
    return compare.RunResult(trainer, seed, rows, batch_size=128, wall_seconds=10 * step_s,
                             held_out={"mean": held_out, "positive": 0.5 + held_out})


def _runs(project_gain: float) -> list:
    runs = []
    for seed, noise in ((0, 0.0), (1, 0.02), (2, -0.02)):
        runs.append(_run("project", seed, 2.0, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], 0.1 + project_gain + noise))
        runs.append(_run("reference", seed, 4.0, [0.0, 0.1, 0.2, 0.3, 0.4, 0.6], 0.1 + 0.2 + noise))
    return runs


def test_compare_tables_report_the_ratio_and_held_out_gain():
    initial = {"mean": 0.1, "positive": 0.5}
    tabs = compare.tables(_runs(0.2), initial)
    head, rows = tabs["speed"]
    assert head[1:] == ["project", "reference", "project / reference"]
    assert rows[0][1].startswith("64.00") and rows[0][2].startswith("32.00")  # 128 / 2.0 s, 128 / 4.0 s
    assert rows[0][3].startswith("2.00")
    assert rows[4][1:3] == ["1.200", "2.400"]  # update: 0.6 of the step
    head, rows = tabs["held_out"]
    gain = head.index("gain")
    assert [r[gain].split()[0] for r in rows] == ["+0.200", "+0.200"]
    seeds = tabs["seeds"][1]
    assert len(seeds) == 8  # 3 seeds and the mean row, per trainer


@pytest.mark.parametrize("gain, verdict", [(0.2, "agree"), (0.17, "agree"), (0.1, "differ"), (0.0, "differ")])
def test_equal_learning_compares_gains_within_the_spread(gain: float, verdict: str):
    line = compare.equal_learning(_runs(gain), {"mean": 0.1, "positive": 0.5})
    assert line.endswith(f"they {verdict}")
    assert "standard errors" in line


def test_figure_is_drawn(tmp_path):
    path = tmp_path / "reward.png"
    compare.figure(_runs(0.2), path, "made-up runs")
    assert path.stat().st_size > 10_000


def test_phases_overhead_is_the_system_step_minus_the_parts_alone():
    alone = [{f"time/{p}": s for p, s in zip(phases.PHASES, (0.01, 0.5, 0.1, 2.5))} for _ in range(3)]
    system = [{**{f"time/{p}": s for p, s in zip(phases.PHASES, (0.02, 0.6, 0.15, 2.6))},
               "time/step": 3.4, "time/rollout": 0.78} for _ in range(3)]
    r = phases.report(alone, system)
    assert r["alone/sum"] == pytest.approx(3.11)
    assert r["overhead"] == pytest.approx(0.29)
    assert r["overhead_share"] == pytest.approx(0.29 / 3.4)


def test_memory_table_divides_the_budget_by_bytes_per_parameter():
    memory = _load("memory")
    assert memory.largest(20.0, 80) == pytest.approx(4.0)  # 80 GB at 20 bytes a parameter: 4B parameters
    rows = [{"policy": "gpt2-small", "mode": "full fp32", "params": 124e6, "peak_bytes": 40 * 124e6,
             "bytes_per_param": 40.0}, {"policy": "stand-in", "mode": "LoRA r=8", "params": 7e6,
                                        "peak_bytes": 7e7, "bytes_per_param": 10.0}]
    lines = memory.table(rows).splitlines()
    assert lines[2].endswith("| 40.0 | 0.60B | 2.00B |") and lines[3].endswith("| 10.0 |  |  |")


def test_phases_alone_side_steps_as_the_systems_ranks(monkeypatch):
    """phases.py's alone side runs the learner as the system does, 2 DDP ranks here: the step's
    statistics are one rank's, up to float summation order (the comparison is void otherwise)."""
    from learner.config import parse_args, resolve_local_paths
    from learner.core.actor import LearnerActor

    monkeypatch.chdir(REPO)
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # the peer rank's process imports phases by name
    import phases as importable_phases
    cfg = resolve_local_paths(parse_args(["--config", "configs/stand-in-quick.yaml", "--ppo.batch_size", "4",
                                          "--ppo.mini_batch_size", "4", "--cluster.learner_processes", "2"]))
    batch = ([[10, 11, 12], [13, 14], [15, 16, 17, 18], [19]], [[20, 21], [22], [23, 24, 25], [26, 27]],
             [0.5, -0.2, 1.0, 0.1])
    one = LearnerActor(cfg.policy, cfg.ppo, seed=cfg.run.seed).step(*batch)
    ranks = importable_phases.AloneLearner(cfg)
    try:
        assert len(ranks.peers) == 1 and ranks.peers[0][0].is_alive()
        two = ranks.step(*batch)
    finally:
        ranks.close()
    assert not ranks.peers[0][0].is_alive()
    for key in ("objective/kl", "ppo/loss/total", "ppo/policy/approxkl", "env/reward_mean"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
