"""Merge run folders of one benchmark (the same experiment run in parallel, one process per
seed or per group of rows) into one results.json, results.md and accuracy.png.

    python bench/merge_runs.py --out bench/results runs/fm/seed1993 runs/fm/seed1994 ...

Runs are keyed by (method, seed); the merged config lists the methods and seeds found, in
the order of `--config`'s methods and seeds when given. Summaries are recomputed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dmc_core.experiment.metrics import aggregate
from dmc_core.experiment.report import write_run_outputs


def merge(results: list[dict[str, Any]], methods: list[str], seeds: list[int]) -> dict[str, Any]:
    runs: dict[tuple[str, int], dict[str, Any]] = {}
    for result in results:
        for run in result["runs"]:
            if run["completed_tasks"] == result["n_tasks"]:
                runs.setdefault((run["method"], run["seed"]), run)
    found_methods = [m for m in methods if any(k[0] == m for k in runs)]
    found_seeds = [s for s in seeds if any(k[1] == s for k in runs)]
    ordered = [runs[(m, s)] for s in found_seeds for m in found_methods if (m, s) in runs]
    merged = dict(results[0])
    merged["config"] = {**merged["config"], "methods": found_methods, "seeds": found_seeds}
    merged.update(
        name=merged["config"]["name"],
        complete=all((m, s) in runs for m in methods for s in seeds),
        methods=found_methods,
        seeds=found_seeds,
        runs=ordered,
        summary={
            m: aggregate([r["metrics"] for r in ordered if r["method"] == m]) for m in found_methods
        },
        sources=[r.get("name") for r in results],
    )
    per_method = {
        m: sum(r["seconds"]["total"] for r in ordered if r["method"] == m) for m in found_methods
    }
    merged["seconds"] = {
        "per_method": per_method,
        "compute_total": sum(per_method.values()),
        "wall_this_invocation": max(r["seconds"]["wall_this_invocation"] for r in results),
    }
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--methods", nargs="*", help="row order (default: as found)")
    parser.add_argument("--name", help="experiment name of the merged results")
    args = parser.parse_args()
    paths = [f / "results.json" for f in args.folders]
    for path in paths:
        if not path.is_file():
            print(f"skipped {path.parent}: no finished run yet")
    results = [json.loads(p.read_text()) for p in paths if p.is_file()]
    methods = args.methods or list(dict.fromkeys(m for r in results for m in r["methods"]))
    seeds = sorted({s for r in results for s in r["seeds"]})
    merged = merge(results, methods, seeds)
    if args.name:
        merged["name"] = merged["config"]["name"] = args.name
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(merged, indent=1) + "\n")
    write_run_outputs(merged, args.out)
    print((args.out / "results.md").read_text())


if __name__ == "__main__":
    main()
