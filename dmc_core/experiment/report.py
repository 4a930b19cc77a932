"""Tables and plots of results: one run folder (`results.md`, `accuracy.png`) or several
merged (`dmc report DIR...`: `report.md`, `report.png`, `report.json`), mean ± std over seeds."""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dmc_core.experiment.metrics import aggregate, mean_std

__all__ = ["Group", "group_runs", "markdown_report", "merge_reports", "plot_accuracy"]


@dataclass
class Group:
    """The runs (one per seed) of one method in one experiment."""

    experiment: str
    method: str
    label: str
    runs: list[dict[str, Any]]

    @property
    def summary(self) -> dict[str, Any]:
        return aggregate([r["metrics"] for r in self.runs])

    @property
    def learn_seconds_per_task(self) -> dict[str, Any]:
        """Training seconds per task (mean over the tasks of a run), mean ± std over seeds."""
        per_run = []
        for run in self.runs:
            learn = [s.get("learn", 0.0) for s in run["seconds"]["per_task"]]
            per_run.append(sum(learn) / len(learn) if learn else None)
        return mean_std(per_run)

    @property
    def classes_seen(self) -> list[int]:
        sizes = [len(task) for task in self.runs[0]["tasks"]]
        return [sum(sizes[: t + 1]) for t in range(len(sizes))]

    @property
    def seeds(self) -> list[int]:
        return [r["seed"] for r in self.runs]


def group_runs(results: Sequence[dict[str, Any]]) -> list[Group]:
    """Group runs by (experiment name, method) in first-seen order; a repeated
    (experiment, method, seed) is kept once, with a warning."""
    groups: dict[tuple[str, str], Group] = {}
    seen: set[tuple[str, str, int]] = set()
    names = list(dict.fromkeys(r["name"] for r in results))
    for result in results:
        for run in result["runs"]:
            key = (result["name"], run["method"], run["seed"])
            if key in seen:
                warnings.warn(f"run {key} appears twice; keeping the first", stacklevel=2)
                continue
            seen.add(key)
            label = run["method"] if len(names) == 1 else f"{result['name']}/{run['method']}"
            group = groups.setdefault(key[:2], Group(result["name"], run["method"], label, []))
            group.runs.append(run)
    return list(groups.values())


def _cell(stats: dict[str, Any], digits: int = 2) -> str:
    if stats["mean"] is None:
        return "–"
    if stats["n"] > 1:
        return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return f"{stats['mean']:.{digits}f}"


def accuracy_table(groups: Sequence[Group]) -> str:
    n_tasks = max((len(g.runs[0]["tasks"]) for g in groups), default=0)
    header = [
        "Method",
        "Avg",
        "Last",
        "Forgetting ↓",
        "Forgetting (PyCIL) ↓",
        "Old",
        "New",
        "Train s/task",
        *[f"A{t + 1}" for t in range(n_tasks)],
    ]
    lines = ["| " + " | ".join([*header, "Seeds"]) + " |", "|" + "---|" * (len(header) + 1)]
    for group in groups:
        summary = group.summary
        per_task = [_cell(s) for s in summary["accuracy_per_task"]]
        per_task += [""] * (n_tasks - len(per_task))
        cells = [
            group.label,
            _cell(summary["avg"]),
            _cell(summary["last"]),
            _cell(summary["forgetting"]),
            _cell(summary["forgetting_pycil"]),
            _cell(summary["old_accuracy_last"]),
            _cell(summary["new_accuracy_last"]),
            _cell(group.learn_seconds_per_task, digits=1),
            *per_task,
            ", ".join(str(s) for s in group.seeds),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diagnostics_table(groups: Sequence[Group]) -> str | None:
    rows = []
    n_tasks = max((len(g.runs[0]["tasks"]) for g in groups), default=0)
    for group in groups:
        cells = []
        for t in range(1, n_tasks):
            found = [
                r["diagnostics"][t]
                for r in group.runs
                if t < len(r.get("diagnostics", [])) and r["diagnostics"][t]
            ]
            if not found:
                cells.append("")
                continue
            before = mean_std([d["mean_cosine_before"] for d in found])["mean"]
            after = mean_std([d["mean_cosine_after"] for d in found])["mean"]
            cells.append(f"{before:.3f} → {after:.3f}")
        if any(cells):
            rows.append("| " + " | ".join([group.label, *cells]) + " |")
    if not rows:
        return None
    header = "| Method | " + " | ".join(f"task {t + 1}" for t in range(1, n_tasks)) + " |"
    return "\n".join([header, "|" + "---|" * n_tasks, *rows])


def timing_table(results: Sequence[dict[str, Any]], groups: Sequence[Group]) -> str:
    lines = ["| Method | compute (s, all seeds) |", "|---|---|"]
    for group in groups:
        total = sum(r["seconds"]["total"] for r in group.runs)
        lines.append(f"| {group.label} | {total:.1f} |")
    walls = [r["seconds"]["wall_this_invocation"] for r in results if "seconds" in r]
    computes = [r["seconds"]["compute_total"] for r in results if "seconds" in r]
    lines.append(
        f"\nTotal compute {sum(computes):.1f} s; wall time of the last invocation "
        f"{sum(walls):.1f} s."
    )
    return "\n".join(lines)


def markdown_report(results: Sequence[dict[str, Any]], title: str | None = None) -> str:
    groups = group_runs(results)
    first = results[0]
    if title is None:
        title = ", ".join(dict.fromkeys(r["name"] for r in results))
    described = "; ".join(
        dict.fromkeys(
            f"{r['dataset']['name']} {r['protocol']} ({r['n_tasks']} tasks, "
            f"{r['config']['backbone']['name']})"
            for r in results
        )
    )
    parts = [
        f"# {title}",
        "",
        f"{described}. Accuracy in % on the {first['dataset'].get('eval_split', 'test')} "
        "split, mean ± std (sample std) over seeds. Avg: mean of the accuracies after each "
        "task; Last: after the last task; Forgetting: mean over old tasks of best accuracy "
        "before the last task minus final accuracy; Forgetting (PyCIL): the same with the "
        "best over all tasks including the last (lower is better for both); Old / New: "
        "accuracy after the last task on the earlier tasks' / the last task's classes; "
        "Train s/task: seconds to learn one task (mean over tasks); A<t>: accuracy on all "
        "classes seen after task t.",
        "",
        accuracy_table(groups),
    ]
    diagnostics = diagnostics_table(groups)
    if diagnostics:
        parts += [
            "",
            "## Calibration diagnostic",
            "",
            "Cosine between each old class's Gaussian-memory mean and its true mean (its "
            "train images under the encoder after the task), averaged over old classes and "
            "seeds: before → after the task's calibration (equal for methods without one).",
            "",
            diagnostics,
        ]
    parts += ["", "## Time", "", timing_table(results, groups)]
    git = first.get("environment", {}).get("git", {})
    if git.get("commit"):
        dirty = " (with uncommitted changes)" if git.get("dirty") else ""
        parts += ["", f"Code: commit {git['commit'][:12]}{dirty}."]
    return "\n".join(parts) + "\n"


def plot_accuracy(groups: Sequence[Group], path: Path, title: str = "") -> None:
    """Accuracy after each task against classes seen, mean ± std band, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    experiments = list(dict.fromkeys(g.experiment for g in groups))
    fig, axes = plt.subplots(
        1, len(experiments), figsize=(6.4 * len(experiments), 4.4), squeeze=False
    )
    for ax, experiment in zip(axes[0], experiments, strict=True):
        for group in (g for g in groups if g.experiment == experiment):
            stats = group.summary["accuracy_per_task"]
            x = group.classes_seen[: len(stats)]
            mean = [s["mean"] for s in stats]
            std = [s["std"] or 0.0 for s in stats]
            (line,) = ax.plot(x, mean, marker="o", label=group.method)
            lower = [m - s for m, s in zip(mean, std, strict=True)]
            upper = [m + s for m, s in zip(mean, std, strict=True)]
            ax.fill_between(x, lower, upper, color=line.get_color(), alpha=0.15)
        ax.set_title(title if len(experiments) == 1 and title else experiment)
        ax.set_xlabel("classes seen")
        ax.set_ylabel("accuracy on seen classes (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_run_outputs(results: dict[str, Any], out: Path) -> None:
    (out / "results.md").write_text(markdown_report([results]))
    title = f"{results['name']} ({results['dataset']['name']} {results['protocol']})"
    plot_accuracy(group_runs([results]), out / "accuracy.png", title)


def merge_reports(folders: Sequence[Path], out: Path) -> dict[str, Any]:
    """Merge the results of several run folders into one table and plot."""
    results = []
    for folder in folders:
        path = Path(folder) / "results.json" if Path(folder).is_dir() else Path(folder)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a finished run folder?")
        results.append(json.loads(path.read_text()))
    if not results:
        raise ValueError("no run folders given")
    groups = group_runs(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(markdown_report(results))
    plot_accuracy(groups, out / "report.png")
    merged = {
        "sources": [str(f) for f in folders],
        "groups": [
            {
                "experiment": g.experiment,
                "method": g.method,
                "seeds": g.seeds,
                "summary": g.summary,
            }
            for g in groups
        ],
    }
    (out / "report.json").write_text(json.dumps(merged, indent=1) + "\n")
    return merged
