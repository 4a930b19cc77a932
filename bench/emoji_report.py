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
                "diagnostics": [r.get("diagnostics") for r in records],
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
                    "alignment_last_task": alignment(run),
                }
            )
    rows.sort(key=lambda r: (r["test_style"], -(r["metrics"]["last"] or 0.0)))
    return rows


def alignment(run: dict[str, Any]) -> dict[str, float] | None:
    """METHOD.md's diagnostic at the last task that has it: the mean cosine between the old
    classes' memory means and their true means under the new encoder, before and after
    the calibration."""
    found = [d for d in run.get("diagnostics") or [] if d]
    if not found:
        return None
    last = found[-1]
    return {k: last[k] for k in ("mean_cosine_before", "mean_cosine_after")}


def _scalars(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A record's single values, without its per-class lists and tables."""
    if record is None:
        return None
    return {k: v for k, v in record.items() if not isinstance(v, list | dict)}


def _slim_report(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if report is None:
        return None
    return {
        **(_scalars(report) or {}),
        "seconds": report.get("seconds"),
        "calibration": _scalars(report.get("calibration")),
    }


def slim(results: dict[str, Any]) -> dict[str, Any]:
    """A source run for the committed report without the per-class lists and tables of its
    task reports and diagnostics (several MB over 17 tasks; the run folder keeps them)."""
    results = {**results, "runs": [dict(run) for run in results["runs"]]}
    for run in results["runs"]:
        run["diagnostics"] = [_scalars(d) for d in run.get("diagnostics") or []]
        run["task_reports"] = [_slim_report(r) for r in run.get("task_reports") or []]
    return results


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
    """One line per trained row: the update at the second task, half-way and the last,
    the phases of the last, and the peak RSS (every task's figures are in results.json)."""
    lines = [
        "| method | test style | update s (classes) | last / second | phases of the last (s) "
        "| peak RSS (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if not any(s is not None for s in row["update_stages"]):
            continue  # training-free rows: no update to speak of
        seconds, classes = row["update_seconds"], row["classes_learned"]
        picks = sorted({min(1, len(seconds) - 1), len(seconds) // 2, len(seconds) - 1})
        points = ", ".join(f"{seconds[i]:.1f} ({classes[i]})" for i in picks)
        ratio = growth(row)
        phases = ", ".join(f"{k} {v:.1f}" for k, v in (row["update_stages"][-1] or {}).items())
        rss = row["peak_rss_bytes"][-1]
        lines.append(
            f"| {row['method']} | {row['test_style']} | {points} "
            f"| {'' if ratio is None else f'{ratio:.2f}x'} | {phases} "
            f"| {'' if rss is None else f'{rss / 2**20:.0f}'} |"
        )
    return "\n".join(lines)


def alignment_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| method | test style | cosine before calibration | after |",
        "|---|---|---|---|",
    ]
    for row in rows:
        if row["alignment_last_task"]:
            a = row["alignment_last_task"]
            lines.append(
                f"| {row['method']} | {row['test_style']} | {a['mean_cosine_before']:.3f} "
                f"| {a['mean_cosine_after']:.3f} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    styles = sorted({r["test_style"] for r in rows})
    # One colour per method in every panel (tab20: more methods than the default cycle).
    methods = sorted({r["method"] for r in rows})
    colours = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(methods)}
    figure, axes = plt.subplots(
        1, len(styles), figsize=(6 * len(styles), 4.5), sharey=True, squeeze=False
    )
    for axis, style in zip(axes[0], styles, strict=True):
        for row in (r for r in rows if r["test_style"] == style):
            axis.plot(
                row["classes_learned"],
                row["accuracy_per_task"],
                marker=".",
                label=row["method"],
                color=colours[row["method"]],
            )
        axis.set(
            xlabel="classes learned",
            ylabel="accuracy on all seen classes (%)",
            title=f"test style: {style}",
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=120)
    plt.close(figure)

    trained = [r for r in rows if any(s is not None for s in r["update_stages"])]
    if not trained:
        return
    # Colour: the method; line style: the held-out style.
    dashes = {style: ("-", "--", ":", "-.")[i % 4] for i, style in enumerate(styles)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for row in trained:
        look = {
            "marker": ".",
            "color": colours[row["method"]],
            "linestyle": dashes[row["test_style"]],
            "label": f"{row['method']} (test {row['test_style']})",
        }
        left.plot(row["classes_learned"], row["update_seconds"], **look)
        if all(v is not None for v in row["peak_rss_bytes"]):
            mib = [v / 2**20 for v in row["peak_rss_bytes"]]
            right.plot(row["classes_learned"], mib, **look)
    left.set(xlabel="classes learned", ylabel="seconds", title="one task's update")
    right.set(xlabel="classes learned", ylabel="MiB", title="peak resident memory so far")
    for axis in (left, right):
        axis.grid(alpha=0.3)
    right.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
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
    sources = [slim(read_results(f)) for f in args.folders]
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
            "Each task's update (`learn`, seconds) against the classes learned after it, and "
            "the peak RSS of the process at the end:",
            cost_table(rows),
            "Calibration diagnostic at the last task (METHOD.md): mean cosine between the old "
            "classes' memory means and their true means under the new encoder:",
            alignment_table(rows),
        ]
    )
    (args.out / "results.md").write_text(text + "\n")
    plot(rows, args.out)
    print(text)


if __name__ == "__main__":
    main()
