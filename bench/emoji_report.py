"""The emoji benchmark's report: accuracy per held-out style and averaged over styles, and
what each task's update cost against the classes learned so far.

    python bench/emoji_report.py runs/emoji/free-openmoji runs/emoji/dmc_ot-openmoji \
        --out bench/results/emoji

Each argument is a run folder of `configs/emoji_standin.yaml` (any methods, any held-out
style, possibly stopped after `max_tasks`). `dmc report` groups runs by experiment name and
seed, so it cannot tell styles apart; this script keys rows by (method, test style).
Writes OUT/results.json (the rows and every source run), OUT/results.md (the tables),
OUT/accuracy.png (accuracy after each task) and OUT/update_cost.png (update seconds and
peak memory against classes learned). The growth check: the update at the last task
against the second (the target is at most 10x).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import yaml

from dmc_core.experiment.metrics import compute_metrics


def stopped_run(folder: Path) -> dict[str, Any]:
    """results.json's fields this script reads, from the finished tasks of a run that was
    stopped before its end (the runner's progress/*/partial.json). The emoji dataset has
    one test image per class, so a task's evaluation count is its number of classes."""
    config = yaml.safe_load((folder / "config.yaml").read_text())
    runs = []
    for path in sorted(folder.glob("progress/*/partial.json")):
        partial = json.loads(path.read_text())
        records = partial["tasks"]
        counts = [len(r["classes"]) for r in records]
        runs.append(
            {
                "method": partial["method"],
                "seed": partial["seed"],
                "completed_tasks": partial["completed"],
                "tasks": [r["classes"] for r in records],
                "metrics": compute_metrics([r["correct"] for r in records], counts),
                "seconds": {"per_task": [r["seconds"] for r in records]},
                "memory_per_task": [r.get("memory") for r in records],
            }
        )
    n_tasks = max(
        (json.loads(p.read_text())["n_tasks"] for p in folder.glob("progress/*/partial.json")),
        default=0,
    )
    return {"config": config, "n_tasks": n_tasks, "runs": runs, "stopped": True}


def read_results(folder: Path) -> dict[str, Any]:
    path = folder / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    if not results.get("complete"):
        return stopped_run(folder)
    return results


def load_runs(folders: list[Path]) -> list[dict[str, Any]]:
    """One row per (method, seed) of every folder, with its held-out style."""
    rows = []
    for folder in folders:
        results = read_results(folder)
        style = results["config"]["dataset"]["options"].get("test_style", "openmoji")
        for run in results["runs"]:
            if not run["completed_tasks"]:
                continue
            classes = [sum(len(t) for t in run["tasks"][: i + 1]) for i in range(len(run["tasks"]))]
            seconds = run["seconds"]["per_task"]
            memory = run.get("memory_per_task") or [None] * len(seconds)
            rows.append(
                {
                    "method": run["method"],
                    "seed": run["seed"],
                    "test_style": style,
                    "folder": str(folder),
                    "tasks_run": run["completed_tasks"],
                    "tasks_planned": results["n_tasks"],
                    "metrics": {k: run["metrics"][k] for k in ("avg", "last", "forgetting")},
                    "accuracy_per_task": run["metrics"]["accuracy_per_task"],
                    "classes_learned": classes[: len(seconds)],
                    "update_seconds": [s["learn"] for s in seconds],
                    "update_stages": [s.get("learn_stages") for s in seconds],
                    "peak_rss_bytes": [m["peak_rss_bytes"] if m else None for m in memory],
                }
            )
    return rows


def growth(row: dict[str, Any]) -> float | None:
    """Update seconds at the last task / at the second (None without two tasks)."""
    seconds = row["update_seconds"]
    if len(seconds) < 2 or seconds[1] <= 0:
        return None
    return seconds[-1] / seconds[1]


def _pct(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    styles = sorted({r["test_style"] for r in rows})
    lines = [
        "| method | test style | tasks | classes | Avg | Last | forgetting |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        m = row["metrics"]
        lines.append(
            f"| {row['method']} | {row['test_style']} | {row['tasks_run']}/{row['tasks_planned']}"
            f" | {row['classes_learned'][-1]} | {_pct(m['avg'])} | {_pct(m['last'])} "
            f"| {_pct(m['forgetting'])} |"
        )
    if len(styles) > 1:
        lines += ["", "Mean over the held-out styles (complete runs only):", ""]
        lines += ["| method | styles | Avg | Last | forgetting |", "|---|---|---|---|---|"]
        for method in dict.fromkeys(r["method"] for r in rows):
            done = [
                r for r in rows if r["method"] == method and r["tasks_run"] == r["tasks_planned"]
            ]
            if len(done) < 2:
                continue
            cells = [
                _pct(statistics.mean(r["metrics"][k] for r in done))
                for k in ("avg", "last", "forgetting")
            ]
            used = ", ".join(r["test_style"] for r in done)
            lines.append(f"| {method} | {used} | {' | '.join(cells)} |")
    return "\n".join(lines)


def per_task_table(rows: list[dict[str, Any]]) -> str:
    """Accuracy after each task, so that stopped runs compare at equal classes learned."""
    longest = max(rows, key=lambda r: len(r["classes_learned"]))["classes_learned"]
    lines = [
        "| method | test style | " + " | ".join(str(c) for c in longest) + " |",
        "|---|---|" + "---|" * len(longest),
    ]
    for row in rows:
        cells = [_pct(a) for a in row["accuracy_per_task"]]
        cells += [""] * (len(longest) - len(cells))
        lines.append(f"| {row['method']} | {row['test_style']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test style | classes learned | update s | stages (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not any(s is not None for s in row["update_stages"]):
            continue  # training-free rows: no update to speak of
        for classes, seconds, stages, rss in zip(
            row["classes_learned"],
            row["update_seconds"],
            row["update_stages"],
            row["peak_rss_bytes"],
            strict=True,
        ):
            phases = ", ".join(f"{k} {v:.1f}" for k, v in (stages or {}).items())
            mib = "" if rss is None else f"{rss / 2**20:.0f}"
            lines.append(
                f"| {row['method']} | {row['test_style']} | {classes} | {seconds:.1f} | {phases} "
                f"| {mib} |"
            )
        ratio = growth(row)
        if ratio is not None:
            lines.append(
                f"| {row['method']} | {row['test_style']} | last / second task | {ratio:.2f}x | | |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        axis.plot(
            row["classes_learned"],
            row["accuracy_per_task"],
            marker=".",
            label=f"{row['method']} (test {row['test_style']})",
        )
    axis.set(xlabel="classes learned", ylabel="accuracy on all seen classes (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    plt.close(figure)

    trained = [r for r in rows if any(s is not None for s in r["update_stages"])]
    if not trained:
        return
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for row in trained:
        label = f"{row['method']} (test {row['test_style']})"
        left.plot(row["classes_learned"], row["update_seconds"], marker=".", label=label)
        if all(v is not None for v in row["peak_rss_bytes"]):
            mib = [v / 2**20 for v in row["peak_rss_bytes"]]
            right.plot(row["classes_learned"], mib, marker=".", label=label)
    left.set(xlabel="classes learned", ylabel="seconds", title="one task's update")
    right.set(xlabel="classes learned", ylabel="MiB", title="peak resident memory so far")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "update_cost.png", dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="run folders with results.json")
    parser.add_argument("--out", type=Path, default=Path("bench/results/emoji"))
    args = parser.parse_args()
    rows = load_runs(args.folders)
    args.out.mkdir(parents=True, exist_ok=True)
    sources = [read_results(f) for f in args.folders]
    report = {
        "rows": rows,
        "growth_last_over_second": {f"{r['method']}/{r['test_style']}": growth(r) for r in rows},
        "sources": sources,
    }
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    text = "\n\n".join(
        [
            "# Emoji benchmark (configs/emoji_standin.yaml)",
            "Accuracy in %, one image per class of the held-out style.",
            accuracy_table(rows),
            "Accuracy after each task (columns: classes learned):",
            per_task_table(rows),
            "Each task's update (`learn`), the classes learned after it, the peak RSS of the "
            "process so far:",
            cost_table(rows),
        ]
    )
    (args.out / "results.md").write_text(text + "\n")
    plot(rows, args.out)
    print(text)


if __name__ == "__main__":
    main()
