"""Tune every method on the validation split with the same number of trials, and tabulate.

    python bench/tune.py configs/fashion_mnist_standin.yaml \
        bench/tuning/fashion_mnist_standin.yaml --out runs/tune [--methods dmc] [--table-only]

Runs each method's trials of the grid (dmc_core/experiment/tuning.py) one after the other
into `OUT/<method>/trial<i>` (resumed when run again), then writes `OUT/tuning.md` and
`OUT/tuning.json`: validation Last / Avg per trial, the best trial of each method marked.
Several processes may run disjoint `--methods` into the same OUT; `--table-only` then
collects what finished.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dmc_core.experiment.tuning import TuningGrid, collect_trials, run_trials, tuning_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the experiment's YAML")
    parser.add_argument("grid", type=Path, help="the trials' YAML")
    parser.add_argument("--out", type=Path, default=Path("runs/tune"))
    parser.add_argument("--methods", nargs="+", help="only these methods (default: the grid's)")
    parser.add_argument("--table-only", action="store_true", help="collect, run nothing")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()
    grid = TuningGrid.load(args.grid)
    if not args.table_only:
        run_trials(args.config, grid, args.out, args.methods, show_progress=not args.no_progress)
    collected = collect_trials(grid, args.out)
    table = tuning_table(collected)
    (args.out / "tuning.md").write_text(table)
    (args.out / "tuning.json").write_text(json.dumps(collected, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
