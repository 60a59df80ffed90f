"""The report's command line: ``python -m learner.report RUN_DIR [--queries 16] [--seed 0]``.

Writes the reward figure and the before/after table of a finished run into its directory
(``learner.records.report``, also called by the driver at the end of a run).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from learner.records.report import ReportError, make_report
from rewards.sources import RewardSourceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m learner.report",
        description="Reward figure and before/after table of a finished run, written into its directory.")
    parser.add_argument("run_dir", type=Path, help="a run directory of python -m learner.main")
    parser.add_argument("--queries", type=int, default=16, help="held-out test queries in the table (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="picks the queries and seeds sampling (default: 0)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's default)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = make_report(args.run_dir, args.queries, args.seed, torch_threads=args.threads or None)
    except (ReportError, OSError, ValueError, RewardSourceError) as err:
        # ValueError covers ConfigError and ModelLoadError from the loaders.
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    print(f"figure: {result['figure'] or 'not written (no rewards logged)'}")
    print(f"table:  {result['markdown']}  (csv: {result['csv']})")
    print(f"reward over {args.queries} held-out queries: mean {result['mean_before']:+.3f} -> "
          f"{result['mean_after']:+.3f}, median {result['median_before']:+.3f} -> {result['median_after']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
