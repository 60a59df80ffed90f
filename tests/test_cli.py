"""The first thing a user types: every entry point's --help, and bad input as one line.

``--help`` runs as a user runs it (a subprocess); the bad-input table calls the real
``main`` in-process (the same function ``python -m learner.main`` runs; every case stops
before Ray starts, so a case costs milliseconds, not a Ray start).
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from learner import main as driver
from learner.main import SETUP, missing_dependency_fix
from learner.config import Config, leaves, parse_args

from conftest import IMDB_DIR, POLICY_DIR, REPO, REWARD_DIR

ENTRY_POINTS = [["-m", "learner.main"], ["-m", "learner.report"]] + [
    [str(p.relative_to(REPO))] for p in sorted([*(REPO / "benchmarks").glob("*.py"), *(REPO / "docs").glob("*.py")])]


def _help(entry: list[str], columns: int = 200) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, *entry, "--help"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"{' '.join(entry)} --help exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.mark.parametrize("entry", ENTRY_POINTS, ids=[" ".join(e) for e in ENTRY_POINTS])
def test_help_exits_0_and_names_every_setting(entry: list[str]):
    text = _help(entry)
    if entry == ["-m", "learner.main"]:
        names = [f"--{name}" for name in leaves()] + ["--config"]
    else:  # an argparse script: every flag its source declares
        source = (REPO / "learner" / "report.py" if entry[-1] == "learner.report" else REPO / entry[0]).read_text()
        names = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source)
        assert names, f"no flags found in {entry}"
    missing = [n for n in names if not re.search(re.escape(n) + r"(?![\w.-])", text)]
    assert not missing, f"{' '.join(entry)} --help does not name {missing}"


def test_help_shows_each_setting_once_with_its_whole_doc_and_default():
    text = _help(["-m", "learner.main"], columns=100)  # one column of panels
    for name in leaves():
        assert len(re.findall(re.escape(f"--{name}") + r"(?![\w.-])", text)) == 1, name
    flat = " ".join(text.replace("│", " ").split())  # the text of tyro's help panels, without their borders
    # A doc that spans lines is shown whole, and its default once.
    assert ("the behaviour policy's log-probs are then the old log-probs of the PPO ratio. Pays only when "
            "rollout actors have their own GPUs or nodes; no faster where they share the learner's cores "
            '(README: "When ppo.max_lag=1 pays") (default: 0)') in flat
    assert "(default: None)" not in flat


def test_yaml_then_flags_then_aliases(tmp_path: Path):
    file = tmp_path / "c.yaml"
    file.write_text("ppo:\n  learning_rate: 3.0e-4\n  batch_size: 64\n  mini_batch_size: 16\nrun:\n  steps: 5\n")
    cfg = parse_args(["--config", str(file), "--ppo.batch-size", "32", "--seed", "7", "--ppo.bf16", "True",
                      f"--policy={POLICY_DIR}"])
    assert (cfg.ppo.learning_rate, cfg.ppo.batch_size, cfg.ppo.mini_batch_size) == (3e-4, 32, 16)
    assert (cfg.run.steps, cfg.run.seed, cfg.ppo.bf16, cfg.rollout.policy) == (5, 7, True, str(POLICY_DIR))
    assert parse_args([]) == Config()


def _yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    return str(path)


# (argv, the one line it must print); every case exits 2 before Ray starts.
BAD = [
    (["--ppo.learnin_rate", "1"], r"unknown setting 'ppo.learnin_rate'; did you mean 'ppo.learning_rate'"),
    (["--polcy", "x"], r"unknown setting 'polcy'; did you mean 'policy'"),
    (["--ppo.batch_size", "many"], r"--ppo.batch_size: invalid literal for int\(\) with base 10: 'many'"),
    (["--ppo.learning_rate"], r"argument --ppo.learning_rate: expected one argument"),
    (["--ppo.bf16", "maybe"], r"argument --ppo.bf16: invalid choice 'maybe' \(choose from True, False\)"),
    (["--ppo.batch_size", "100"], r"ppo.batch_size \(100\) must be a multiple of ppo.mini_batch_size \(128\)"),
    (["--ppo.mini_batch_size", "0"], r"ppo.mini_batch_size \(0\) must be > 0"),
    (["--ppo.cliprange", "-0.2"], r"ppo.cliprange \(-0.2\) must be > 0"),
    (["--ppo.cliprange_value", "0"], r"ppo.cliprange_value \(0.0\) must be > 0"),
    (["--ppo.vf_coef", "-1"], r"ppo.vf_coef \(-1.0\) must be >= 0"),
    (["--ppo.init_kl_coef", "-0.1"], r"ppo.init_kl_coef \(-0.1\) must be >= 0"),
    (["--ppo.ratio_threshold", "-10"], r"ppo.ratio_threshold \(-10.0\) must be > 0"),
    (["--ppo.target", "0"], r"ppo.target \(0.0\) must be > 0"),
    (["--ppo.horizon", "0"], r"ppo.horizon \(0.0\) must be > 0"),
    (["--ppo.learning_rate", "nan"], r"ppo.learning_rate \(nan\) must be a finite number"),
    (["--ppo.gamma", "inf"], r"ppo.gamma \(inf\) must be a finite number"),
    (["--ppo.lam", "1.5"], r"ppo.lam \(1.5\) must lie in \[0, 1\]"),
    (["--ppo.kl_penalty", "abs"], r"ppo.kl_penalty 'abs' is not supported"),
    (["--ppo.max_lag", "2"], r"ppo.max_lag \(2\) must be 0 or 1"),
    (["--rollout.temperature", "0"], r"rollout: .*temperature > 0"),
    (["--rollout.top_p", "2"], r"rollout: .*0 < top_p <= 1"),
    (["--rollout.response_min_tokens", "20"], r"rollout: need 1 <= response_min_tokens <= response_max_tokens"),
    (["--rollout.dtype", "float8"], r"rollout: dtype 'float8' must be one of float32, bfloat16, float16"),
    (["--ppo.lora_rank", "-1"], r"ppo.lora_rank \(-1\) must be >= 0"),
    (["--rollout.temperature", "nan"], r"rollout.temperature \(nan\) must be a finite number"),
    (["--reward.max_wait_ms", "inf"], r"reward.max_wait_ms \(inf\) must be a finite number"),
    (["--cluster.torch_threads", "-1"], r"cluster.torch_threads \(-1\) must be >= 0"),
    (["--cluster.rollout_gpus", "-0.5"], r"cluster.rollout_gpus \(-0.5\) must be >= 0, or -1"),
    (["--cluster.num_rollout_workers", "0"], r"cluster.num_rollout_workers \(0\) must be > 0"),
    (["--cluster.num_rollout_workers", "300"], r"cluster.num_rollout_workers \(300\) exceeds ppo.batch_size"),
    (["--cluster.placement_strategy", "RANDOM"], r"cluster.placement_strategy 'RANDOM' must be one of PACK"),
    (["--cluster.call_timeout_s", "0"], r"cluster.call_timeout_s \(0.0\) must be > 0"),
    (["--cluster.learner_processes", "0"], r"cluster.learner_processes \(0\) must be > 0"),
    (["--cluster.learner_processes", "200"], r"cluster.learner_processes \(200\) exceeds ppo.mini_batch_size \(128\)"),
    (["--ppo.micro_batch_size", "48"], r"ppo.micro_batch_size \(48\) must divide ppo.mini_batch_size \(128\)"),
    (["--run.keep_checkpoints", "0"], r"run.keep_checkpoints \(0\) must be > 0"),
    (["--run.steps", "-3"], r"run.steps \(-3\) must be >= 0"),
    (["--data.query_min_tokens", "9"], r"data.query_min_tokens \(9\) exceeds data.query_max_tokens \(7\)"),
    (["--policy", "./no/such/folder"], r"rollout.policy: './no/such/folder' does not exist"),
    (["--dataset", "/no/such/data"], r"data.dataset: '/no/such/data' does not exist"),
    (["--config", "/no/such.yaml"], r"--config: '/no/such.yaml' does not exist"),
    (["--config", "YAML:ppo: [1, 2"], r"--config: '.*bad.yaml' is not valid YAML"),
    (["--config", "YAML:- a list"], r"--config: '.*bad.yaml' must hold a mapping of sections"),
    (["--config", "YAML:ppo:\n  cliprnage: 0.1\n"], r"unknown setting 'ppo.cliprnage'; did you mean 'ppo.cliprange'"),
    (["--config", "YAML:ppo:\n  batch_size: lots\n"], r"ppo.batch_size: 'lots' is not a valid int"),
    (["--resume", "/no/such/run"], r"/no/such/run"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a)[:60] for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_2(argv: list[str], message: str, tmp_path: Path, capsys):
    argv = [_yaml(tmp_path, a[5:]) if a.startswith("YAML:") else a for a in argv]
    argv += ["--reward-model", str(REWARD_DIR), "--dataset", str(IMDB_DIR)] if "--dataset" not in argv else []
    assert driver.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(message, err), err


def test_every_float_setting_refuses_nan():
    floats = [name for name, (typ, _) in leaves().items() if typ is float]
    assert len(floats) >= 15
    for name in floats:
        with pytest.raises(ValueError, match=rf"{name.split('.')[-1]}.*nan") as err:
            parse_args([f"--{name}", str(math.nan)])
        assert "\n" not in str(err.value)


def test_missing_dependencies_point_to_the_checkouts_venv_or_the_install(tmp_path: Path):
    """A Python without the project's packages: activate the README's .venv where there is one
    (and it is not this Python's), else install the project."""
    assert SETUP in missing_dependency_fix(tmp_path, sys.prefix)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "python").touch()
    fix = missing_dependency_fix(tmp_path, "/usr")
    assert f"source {tmp_path / '.venv'}/bin/activate" in fix and SETUP not in fix
    assert SETUP in missing_dependency_fix(tmp_path, str(tmp_path / ".venv"))  # the venv itself lacks them


def test_a_run_without_the_dependencies_says_how_to_get_them():
    """A Python without torch, transformers, Ray, datasets or numpy: one line, exit 2, that says
    how to get them (``--help`` itself needs the project's environment: the settings are the
    actors' own dataclasses)."""
    # A finder that refuses those packages, as a Python without them would.
    block = ("import sys\n"
             "class Without:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        top = name.split('.')[0]\n"
             "        if top in ('torch', 'transformers', 'ray', 'datasets', 'numpy', 'pyarrow'):\n"
             "            raise ModuleNotFoundError(f\"No module named '{top}'\", name=top)\n"
             "sys.meta_path.insert(0, Without())\n"
             "from learner.main import main\n"
             "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    for args in (["--help"], ["--rollout.policy", str(POLICY_DIR), "--reward.model", str(REWARD_DIR),
                              "--data.dataset", str(IMDB_DIR), "--run.steps", "1"]):
        run = subprocess.run([sys.executable, "-c", block, *args], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=120)
        assert run.returncode == 2
        lines = run.stderr.strip().splitlines()
        missing = r"error: No module named '(torch|transformers|ray|datasets|numpy|pyarrow)'"
        assert len(lines) == 1 and re.match(missing, lines[0]), run.stderr[-2000:]
        # the same Python: the install line, or the .venv to activate
        assert lines[0].endswith(missing_dependency_fix())
