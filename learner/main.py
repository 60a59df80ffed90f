"""The command line: ``python -m learner.main``.

    # the stand-ins in ../shared, on this machine (Ray starts embedded):
    python -m learner.main --config configs/stand-in.yaml
    # continue a run that stopped (crash, preemption, Ctrl-C):
    python -m learner.main --resume runs/20261126-124951
    # the recipe itself (hub models and data), on a running cluster:
    ray job submit --working-dir . -- python -m learner.main --steps 194

Parses and checks the settings (learner/config.py), then hands them to the driver
(learner/orchestration/driver.py). A Python that lacks the project's dependencies gets one
line that says how to get them instead of a traceback.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

SETUP = "pip install torch==2.13.0 && pip install -e ."


def missing_dependency_fix(root: Path = Path(__file__).resolve().parents[1], prefix: str = sys.prefix) -> str:
    """What to do when this Python lacks the project's packages: use the checkout's ``.venv``
    if the README's set-up made one (the usual cause is a shell where it is not active), or
    install the project."""
    venv = root / ".venv"
    if (venv / "bin" / "python").exists() and Path(prefix).resolve() != venv.resolve():
        return (f"this is not the project's environment; activate the one the README's set-up made "
                f"(`source {venv}/bin/activate`) and run the command again")
    return (f"install the project first, as the README says (`{SETUP}` in a virtual environment; "
            f"on a GPU machine, the torch build for your CUDA)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from learner.config import ConfigError, parse_args, resolve_local_paths
        from learner.orchestration.driver import train
        from learner.orchestration.placement import PlacementError
        from learner.orchestration.recovery import RunError, one_line
        from learner.records.checkpoint import CheckpointError
        from modelhost.loading import ModelLoadError
    except ModuleNotFoundError as err:
        print(f"error: {err} in {sys.executable}: {missing_dependency_fix()}", file=sys.stderr)
        return 2
    try:
        cfg = resolve_local_paths(parse_args(argv))
    except (ConfigError, ModelLoadError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    try:
        train(cfg)
    except (ConfigError, ModelLoadError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (RunError, PlacementError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # a remote failure nobody anticipated: one line, not Ray's traceback wall
        import ray

        if not isinstance(err, ray.exceptions.RayError):
            raise
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: continue with --resume RUN_DIR from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
