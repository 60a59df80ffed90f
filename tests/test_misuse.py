"""Misuse, as a new user (or a hostile file) would try it: each bad input is one line, exit 2,
no traceback, nothing written outside the refused run, and Ray never started.

The table calls the real ``learner.main.main`` in-process with Ray's start replaced by a
tripwire, so a case that got as far as Ray fails loudly and the whole table takes seconds.
Run directories and checkpoints are made by hand (``checkpoint.write``, a config.yaml),
so the resume cases need no earlier run.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

from learner import main as entry
from learner.config import FROZEN_ON_RESUME, Config, get_path, parse_args, set_path
from learner.records import checkpoint
from learner.records.rundir import lock_run_dir

from conftest import POLICY_DIR, REWARD_DIR

# ----------------------------------------------------------------------------- fixtures made by hand


def _safetensors() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"x": torch.zeros(2)})


def _config(dataset: Path) -> Config:
    cfg = Config()
    for name, value in (("rollout.policy", str(POLICY_DIR)), ("reward.model", str(REWARD_DIR)),
                        ("data.dataset", str(dataset)), ("ppo.batch_size", 8), ("ppo.mini_batch_size", 8)):
        set_path(cfg, name, value)
    return cfg


def make_run(out: Path, name: str, dataset: Path, step: int = 3) -> Path:
    """A run directory as a driver leaves it: config.yaml and one checkpoint after ``step`` steps."""
    run_dir = out / name
    run_dir.mkdir(parents=True)
    cfg = _config(dataset)
    set_path(cfg, "run.out_dir", str(out))
    set_path(cfg, "run.name", name)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    learner = {"kl_coef": 0.2, "numpy_rng": {}, "version": step, "aliases": {}, "optimizer_param_groups": [],
               "optimizer_scalars": {}}
    driver = {"step": step, "data": {"epoch": 0, "position": 8 * step}, "seed": 0}
    files = {"learner.safetensors": _safetensors(), "learner.json": json.dumps(learner).encode(),
             "driver.json": json.dumps(driver).encode(), "stats.jsonl": b"", "rollouts.jsonl": b""}
    checkpoint.write(run_dir, step, files, keep_last=3,
                     invariants={n: get_path(cfg, n) for n in FROZEN_ON_RESUME})
    return run_dir


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("data")
    pq.write_table(pa.table({"text": [f"review {i}: " + "a fine long film review " * 12 for i in range(40)]}),
                   folder / "train.parquet")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Broken model folders: a config without weights, truncated weights, a garbled header."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name in ("noweights", "truncated", "garbled"):
        folder = root / name
        shutil.copytree(POLICY_DIR, folder)
        weights = folder / "model.safetensors"
        data = weights.read_bytes()
        weights.chmod(0o644)
        if name == "noweights":
            weights.unlink()
        elif name == "truncated":
            weights.write_bytes(data[: len(data) // 2])
        else:
            weights.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + data[24:])
        out[name] = folder
    out["reward-noweights"] = root / "reward-noweights"
    shutil.copytree(REWARD_DIR, out["reward-noweights"])
    (out["reward-noweights"] / "model.safetensors").unlink()
    return out


# ----------------------------------------------------------------------------- the table

# (case id, argv, the one line it must print). In argv: {out} the output folder, {data} a good
# dataset, {run} a run directory with a checkpoint after 3 steps, {file:TEXT} a file holding
# TEXT (bytes escapes allowed), {models.X} a broken model folder.
BAD = [
    ("yaml not utf-8", ["--config", "{file:ppo:\n  batch_size: 8\nrun:\n  name: caf\\xe9\n}"], r"is not UTF-8 text"),
    ("yaml recursive alias", ["--config", "{file:a: &a [*a]\n}"], r"uses the alias \*a of a mapping or list"),
    ("yaml alias bomb", ["--config", "{file:a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a]\n"
                                     "c: &c [*b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c]\n}"],
     r"uses the alias \*a of a mapping or list"),
    ("yaml section alias", ["--config", "{file:ppo: &p\n  batch_size: 8\nrun: *p\n}"], r"uses the alias \*p"),
    ("yaml duplicate section", ["--config", "{file:ppo:\n  batch_size: 8\nppo:\n  ppo_epochs: 2\n}"],
     r"holds the key 'ppo' twice \(line 3\); keep one"),
    ("yaml duplicate key", ["--config", "{file:ppo:\n  batch_size: 8\n  batch_size: 16\n}"],
     r"holds the key 'batch_size' twice"),
    ("yaml section not a mapping", ["--config", "{file:run: 5\n}"], r"unknown setting 'run'"),
    ("yaml bad seed", ["--config", "{file:run:\n  seed: -1\n}"], r"run.seed \(-1\) must be >= 0"),
    ("yaml folder", ["--config", "{out}"], r"--config: '.*' does not exist"),
    ("seed -1", ["--seed", "-1"], r"run.seed \(-1\) must be >= 0 and <= 4294967295"),
    ("seed 2**32", ["--seed", str(2**32)], r"run.seed \(4294967296\) must be >= 0 and <= 4294967295"),
    ("ppo_epochs 1e9", ["--ppo.ppo_epochs", "1000000000"], r"ppo.ppo_epochs \(1000000000\) must be > 0 and <= 1000"),
    ("batch 1e7", ["--ppo.batch_size", "10000000", "--ppo.mini_batch_size", "10000000"],
     r"ppo.batch_size \(10000000\) must be > 0 and <= 1000000"),
    ("length buckets 0", ["--ppo.length_buckets", "0"], r"ppo.length_buckets \(0\) must be > 0"),
    ("call timeout overflows", ["--cluster.call_timeout_s", "1e12"], r"cluster.call_timeout_s .* must be > 0 and <= 604800"),
    ("placement timeout overflows", ["--cluster.placement_timeout_s", "1e15"], r"placement_timeout_s .* <= 604800"),
    ("rollout workers 5000", ["--cluster.num_rollout_workers", "5000"], r"num_rollout_workers \(5000\) must be > 0 and <= 1024"),
    ("reward workers 0", ["--cluster.num_reward_workers", "0"], r"num_reward_workers \(0\) must be > 0"),
    ("learner processes 1000", ["--cluster.learner_processes", "1000"], r"learner_processes \(1000\) must be > 0 and <= 256"),
    ("max failures 1e5", ["--cluster.max_failures", "100000"], r"max_failures \(100000\) must be >= 0 and <= 1000"),
    ("torch threads 1e5", ["--cluster.torch_threads", "100000"], r"torch_threads \(100000\) must be >= 0 and <= 1024"),
    ("learner gpus 5000", ["--cluster.learner_gpus", "5000"], r"learner_gpus \(5000.0\) .* at most 1024"),
    ("learner cpus 1e6", ["--cluster.learner_cpus", "1e6"], r"learner_cpus \(1000000.0\) must be >= 0 and <= 4096"),
    ("keep checkpoints 1e5", ["--run.keep_checkpoints", "100000"], r"keep_checkpoints \(100000\) must be > 0 and <= 1000"),
    ("report queries 1e6", ["--run.report_queries", "1000000"], r"report_queries \(1000000\) must be >= 0 and <= 10000"),
    ("steps 1e8", ["--run.steps", "100000000"], r"run.steps \(100000000\) must be >= 0 and <= 10000000"),
    ("query tokens 1e5", ["--data.query_max_tokens", "100000"], r"query_max_tokens \(100000\) must be > 0 and <= 4096"),
    ("response tokens 1e5", ["--rollout.response_max_tokens", "100000"], r"response_max_tokens \(100000\) must be > 0"),
    ("top_k -1", ["--rollout.top_k", "-1"], r"rollout: need top_k >= 0"),
    ("device cuda:x", ["--rollout.device", "cuda:x"], r"rollout.device 'cuda:x' is not a device"),
    ("device gpu", ["--rollout.device", "gpu"], r"rollout.device 'gpu' is not a device"),
    ("address word", ["--address", "foo"], r"cluster.address 'foo' is not a Ray address"),
    ("address port", ["--address", "10.0.0.1:99999"], r"cluster.address '10.0.0.1:99999' is not a Ray address"),
    ("address url", ["--address", "http://10.0.0.1:8265/"], r"is not a Ray address"),
    ("run name ..", ["--run.name", ".."], r"run.name '..' must be a plain folder name inside run.out_dir"),
    ("run name escapes", ["--run.name", "../elsewhere"], r"run.name '../elsewhere' must be a plain folder name"),
    ("run name absolute", ["--run.name", "/tmp/elsewhere"], r"run.name '/tmp/elsewhere' must be a plain folder name"),
    ("out-dir is a file", ["--out-dir", "{file:not a folder}"], r"run.out_dir '.*' is a file, not a folder"),
    ("policy without weights", ["--policy", "{models.noweights}"], r"rollout.policy '.*noweights' has no weights"),
    ("policy truncated", ["--policy", "{models.truncated}"], r"model.safetensors is not a valid safetensors file "
                                                             r"\(its tensors extend past the end of the file"),
    ("policy garbled", ["--policy", "{models.garbled}"], r"model.safetensors is not a valid safetensors file"),
    ("classifier as policy", ["--policy", str(REWARD_DIR)], r"rollout.policy: '.*' is a DistilBertForSequence"
                                                            r"Classification, not a causal language model"),
    ("reward without weights", ["--reward-model", "{models.reward-noweights}"], r"reward.model '.*' has no weights"),
    ("corrupt parquet", ["--dataset", "{parquet}"], r"data.dataset: .*train.parquet is not a readable parquet file"),
    ("reused run name", ["--run.name", "used"], r"run directory '.*used' already holds a run: use --resume .* or "
                                                r"another --run.name"),
    ("run dir in use", ["--run.name", "locked"], r"run directory '.*locked' is in use by another driver"),
    ("resume other out-dir", ["--resume", "{run}", "--out-dir", "{out}/other"], r"run.out_dir cannot be given with "
                                                                               r"--resume: the run continues in"),
    ("resume other name", ["--resume", "{run}", "--run.name", "other"], r"run.name cannot be given with --resume"),
    ("resume fewer steps", ["--resume", "{run}", "--steps", "2"], r"run.steps \(2\) is below the 3 steps the "
                                                                  r"checkpoint has done"),
    ("resume batch", ["--resume", "{run}", "--batch-size", "16"], r"ppo.batch_size cannot change on --resume"),
    ("resume max_lag", ["--resume", "{run}", "--ppo.max_lag", "1"], r"ppo.max_lag cannot change on --resume"),
    ("resume yaml seed", ["--config", "{file:run:\n  resume: {run}\n  seed: 4\n}"], r"run.seed cannot change on "
                                                                                   r"--resume"),
    ("resume edited config", ["--resume", "{edited}"], r"run.seed cannot change on --resume \(the run has 0, asked 7\)"),
    ("resume truncated config", ["--resume", "{truncated}"], r"config.yaml lacks \d+ setting\(s\) .*truncated or edited"),
    ("resume bad driver.json", ["--resume", "{badschema}"], r"no usable checkpoint in .*driver.json lacks the field "
                                                            r"'data.position'"),
]


@pytest.fixture
def place(tmp_path: Path, dataset: Path, models: dict[str, Path]):
    """Fills in a case's placeholders, making what they name under ``tmp_path``."""
    out = tmp_path / "runs"
    out.mkdir()
    made: dict[str, str] = {"out": str(out), "data": str(dataset)}

    def runs_dir(name: str) -> str:
        return str(make_run(tmp_path / "made", name, dataset))

    def fill(arg: str, counter=iter(range(100))) -> str:
        if arg.startswith("{file:"):
            path = tmp_path / f"file{next(counter)}.yaml"
            text = arg[6:-1].replace("{run}", made.get("run") or fill("{run}"))
            path.write_bytes(text.encode("latin-1").decode("unicode_escape").encode("latin-1"))
            return str(path)
        if arg.startswith("{models."):
            return str(models[arg[8:-1]])
        if arg in ("{run}", "{edited}", "{truncated}", "{badschema}"):
            key = arg[1:-1]
            if key not in made:
                made[key] = runs_dir(key)
                _damage(Path(made[key]), key)
            return made[key]
        if arg == "{parquet}":
            (tmp_path / "bad-data").mkdir()
            (tmp_path / "bad-data" / "train.parquet").write_bytes(b"PAR1 this is not parquet PAR1")
            return str(tmp_path / "bad-data")
        return arg.format(**made)

    return fill, out


def _damage(run_dir: Path, how: str) -> None:
    config = run_dir / "config.yaml"
    if how == "edited":
        config.write_text(config.read_text().replace("seed: 0", "seed: 7"))
    elif how == "truncated":
        config.write_text(config.read_text()[: len(config.read_text()) // 2].rsplit("\n", 1)[0] + "\n")
    elif how == "badschema":  # wrong fields, and checksums fixed to match, as a careless edit would
        ckpt = checkpoint.list_checkpoints(run_dir)[-1]
        data = b'{"step": 3, "data": {"epoch": 0}, "seed": 0}'
        (ckpt / "driver.json").write_bytes(data)
        manifest = json.loads((ckpt / "MANIFEST.json").read_text())
        import hashlib
        manifest["files"]["driver.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture
def no_ray(monkeypatch):
    """Ray's start as a tripwire: a case that reaches it was not refused before Ray."""
    from learner.orchestration import placement

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray was started: the input was not refused before Ray")

    monkeypatch.setattr(placement, "connect", tripwire)


@pytest.mark.parametrize("case, argv, message", BAD, ids=[c for c, _, _ in BAD])
def test_misuse_is_one_line_exit_2_nothing_written_before_ray(case, argv, message, place, tmp_path, capsys, no_ray):
    fill, out = place
    argv = [fill(a) for a in argv]
    if "--policy" not in argv:
        argv += ["--policy", str(POLICY_DIR)]
    argv += ["--reward-model", str(REWARD_DIR)] if "--reward-model" not in argv else []
    argv += ["--dataset", fill("{data}")] if "--dataset" not in argv else []
    argv += ["--batch-size", "8", "--ppo.mini_batch_size", "8"] if "--batch-size" not in argv and "resume" not in case \
        and "batch" not in case else []
    argv += ["--out-dir", str(out)] if "--out-dir" not in argv and "resume" not in case else []
    if case == "reused run name":
        make_run(out, "used", Path(fill("{data}")))
    lock = lock_run_dir(out / "locked") if case == "run dir in use" else None
    before = _tree(tmp_path)
    try:
        code = entry.main(argv)
    finally:
        if lock:
            lock.close()
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    assert _tree(tmp_path) == before, "the refused run wrote files"


def test_the_table_holds_40_cases_beyond_test_cli():
    from test_cli import BAD as TODAY

    assert len(BAD) >= 40
    assert not {tuple(a) for _, a, _ in BAD} & {tuple(a) for a, _ in TODAY}


# ----------------------------------------------------------------------------- what is accepted

def test_resume_in_yaml_is_the_same_resume_as_the_flag(tmp_path: Path, dataset: Path):
    run_dir = make_run(tmp_path / "runs", "r", dataset)
    config = tmp_path / "c.yaml"
    config.write_text(f"run:\n  resume: {run_dir}\n  steps: 5\n")
    by_yaml = parse_args(["--config", str(config)])
    by_flag = parse_args(["--resume", str(run_dir), "--steps", "5", "--out-dir", str(run_dir.parent),
                          "--run.name", "r"])
    assert by_yaml == by_flag
    assert (by_yaml.run.resume, by_yaml.run.out_dir, by_yaml.run.name) == (str(run_dir), str(run_dir.parent), "r")


def test_two_drivers_cannot_share_a_run_directory(tmp_path: Path):
    from learner.config import ConfigError

    first = lock_run_dir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"is in use by another driver \(pid \d+\)"):
        lock_run_dir(tmp_path / "run")
    first.close()
    lock_run_dir(tmp_path / "run").close()  # free once the first driver ends


def test_checkpoints_use_their_own_temporary_folders_and_replace_only_when_complete(tmp_path: Path, dataset: Path):
    run_dir = make_run(tmp_path, "r", dataset, step=2)
    root = checkpoint.checkpoint_dir(run_dir)
    other = root / ".tmp-step-000002-999-deadbeef"  # another writer's folder, mid-write
    other.mkdir()
    (other / "learner.json").write_text("half")
    first = checkpoint.list_checkpoints(run_dir)[-1]
    before = (first / "MANIFEST.json").read_text()
    files = checkpoint.read(first)
    files.pop("MANIFEST.json", None)
    with pytest.raises(ValueError):  # an incomplete set of files never replaces the checkpoint
        checkpoint.write(run_dir, 2, {k: v for k, v in files.items() if k != "driver.json"}, keep_last=3)
    assert (first / "MANIFEST.json").read_text() == before
    checkpoint.write(run_dir, 2, files, keep_last=3, invariants={"run.seed": 0})
    assert other.is_dir() and (other / "learner.json").read_text() == "half"  # untouched
    assert checkpoint.verify(first) is None and checkpoint.manifest(first)["invariants"] == {"run.seed": 0}
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-000002-999-deadbeef", "step-000002"]


def test_a_hostile_settings_file_is_one_line_as_a_user_runs_it(tmp_path: Path):
    """The real command in its own process: a YAML alias bomb (which expanded before: 1.25 GB in
    20 s) is one line and exit 2 at once, not a hang or a traceback."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi")))
    proc = subprocess.run([sys.executable, "-m", "learner.main", "--config", str(bomb), "--out-dir", str(tmp_path)],
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr[-2000:]
    assert re.match(r"error: --config: '.*bomb.yaml' uses the alias \*a of a mapping or list", proc.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bomb.yaml"]


def test_a_writer_stopped_mid_write_leaves_nothing_the_next_driver_keeps(tmp_path: Path, dataset: Path):
    """A crash between moving the old copy of a step aside and naming the new one: the next
    driver (holding the lock) puts the old copy back; a half-written folder is dropped."""
    run_dir = make_run(tmp_path, "r", dataset, step=2)
    root = checkpoint.checkpoint_dir(run_dir)
    (root / "step-000002").rename(root / ".old-step-000002-123-cafebabe")
    (root / ".tmp-step-000003-123-cafebabe").mkdir()
    checkpoint.tidy(run_dir)
    assert sorted(p.name for p in root.iterdir()) == ["step-000002"]
    assert checkpoint.verify(root / "step-000002") is None


def test_a_second_driver_process_is_refused_while_the_first_holds_the_run(tmp_path: Path, dataset: Path):
    """The lock holds across processes: while this process holds a run directory, the real
    command on the same directory stops with one line naming the holder."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    lock = lock_run_dir(tmp_path / "shared")
    try:
        proc = subprocess.run([sys.executable, "-m", "learner.main", "--policy", str(POLICY_DIR), "--reward-model",
                               str(REWARD_DIR), "--dataset", str(dataset), "--batch-size", "8",
                               "--ppo.mini_batch_size", "8", "--out-dir", str(tmp_path), "--run.name", "shared"],
                              cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=300)
    finally:
        lock.close()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert re.fullmatch(rf"error: run directory '.*shared' is in use by another driver \(pid {os.getpid()}\); wait "
                        r"for it to end or pass another --run.name", proc.stderr.strip()), proc.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == [".lock"]


@pytest.mark.parametrize("driver, problem", [
    ({"step": 3, "data": {"epoch": 0, "position": 0, "extra": 1}, "seed": 0}, "has the unexpected field 'data.extra'"),
    ({"step": 3, "data": {"epoch": 0, "position": -8}, "seed": 0}, "has 'data.position' = '-8', not a non-negative int"),
    ({"step": "3", "data": {"epoch": 0, "position": 0}, "seed": 0}, "has 'step' = '3', not a non-negative int"),
    ({"step": 4, "data": {"epoch": 0, "position": 0}, "seed": 0}, "driver.json says 4 steps, the folder's name another"),
    ([1, 2], "holds list where the file must be an object"),
])
def test_a_checkpoint_whose_json_does_not_fit_its_reader_is_unusable(tmp_path: Path, dataset: Path, driver, problem):
    import hashlib

    run_dir = make_run(tmp_path, "r", dataset, step=3)
    ckpt = checkpoint.list_checkpoints(run_dir)[-1]
    data = json.dumps(driver).encode()
    (ckpt / "driver.json").write_bytes(data)
    manifest = json.loads((ckpt / "MANIFEST.json").read_text())
    manifest["files"]["driver.json"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "MANIFEST.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(ckpt).endswith(problem)
