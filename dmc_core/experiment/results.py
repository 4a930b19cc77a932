"""The results of an experiment: the run folder's file names, results.json (`collect_results`,
one `run_record` per method and seed), the one-line summary of a task, and JSON writing."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dmc_core.data.images import ClassificationDataset
from dmc_core.experiment.config import ExperimentConfig
from dmc_core.experiment.environment import environment
from dmc_core.experiment.features import FeatureCache
from dmc_core.experiment.metrics import aggregate, compute_metrics
from dmc_core.experiment.plan import SeedPlan
from dmc_core.files import atomic_write

RESULTS_FORMAT = 1
CONFIG_FILE = "config.yaml"
RESULTS_FILE = "results.json"
PARTIAL_FILE = "partial.json"


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, default=_json_default) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray | torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def collect_results(
    config: ExperimentConfig,
    dataset: ClassificationDataset,
    plans: list[SeedPlan],
    progress_dir: Callable[[str, int], Path],
    *,
    setup_seconds: dict[str, float],
    cache: FeatureCache,
    complete: bool,
    wall: float,
) -> dict[str, Any]:
    """results.json's dict from the `partial.json` of every finished (or begun) run."""
    runs = []
    for plan in plans:
        for method in config.methods:
            path = progress_dir(method, plan.seed) / PARTIAL_FILE
            if path.is_file():
                runs.append(run_record(json.loads(path.read_text()), plan))
    summary = {
        method: aggregate([r["metrics"] for r in runs if r["method"] == method])
        for method in config.methods
        if any(r["method"] == method for r in runs)
    }
    per_method = {
        method: sum(r["seconds"]["total"] for r in runs if r["method"] == method)
        for method in config.methods
    }
    compute = sum(per_method.values()) + sum(setup_seconds.values())
    return {
        "format_version": RESULTS_FORMAT,
        "name": config.name,
        "complete": complete,
        "config": config.to_dict(),
        "seeds": list(config.seeds),
        "methods": list(config.methods),
        "protocol": config.protocol,
        "n_tasks": len(plans[0].tasks),
        "dataset": {
            "name": dataset.name,
            "n_classes": dataset.n_classes,
            "class_names": dataset.class_names,
            "fingerprint": dataset.fingerprint,
            "eval_split": config.evaluation.split,
        },
        "environment": environment(),
        "runs": runs,
        "summary": summary,
        "seconds": {
            "setup": dict(setup_seconds),
            "per_method": per_method,
            "compute_total": compute,
            "wall_this_invocation": wall,
        },
        "feature_cache": cache.stats(),
    }


def run_record(partial: dict[str, Any], plan: SeedPlan) -> dict[str, Any]:
    records = partial["tasks"]
    counts = plan.eval_counts()
    correct = [r["correct"] for r in records]
    metrics = compute_metrics(correct, counts)
    task_seconds = [r["seconds"] for r in records]
    phases = ("learn", "evaluate", "diagnostics", "save")
    total = sum(s.get(phase, 0.0) for s in task_seconds for phase in phases)
    return {
        "method": partial["method"],
        "seed": partial["seed"],
        "completed_tasks": partial["completed"],
        "class_order": plan.order,
        "tasks": plan.tasks,
        "task_class_names": [r["class_names"] for r in records],
        "eval_counts": counts,
        "correct": correct,
        "metrics": metrics,
        "diagnostics": [r["diagnostics"] for r in records],
        "task_reports": [r["report"] for r in records],
        "seconds": {"total": total, "per_task": task_seconds},
        # records written before peak memory was recorded have none
        "memory_per_task": [r.get("memory") for r in records],
    }


def summary_line(method: str, plan: SeedPlan, t: int, partial: dict[str, Any]) -> str:
    counts = plan.eval_counts()
    correct = [r["correct"] for r in partial["tasks"]]
    metrics = compute_metrics(correct, counts)
    record = partial["tasks"][-1]
    old = metrics["old_accuracy"][-1]
    seconds = record["seconds"]
    parts = [
        f"{method:<9} seed {plan.seed} task {t + 1}/{len(plan.tasks)}",
        f"+{record['class_names']}",
        f"acc {metrics['accuracy_per_task'][-1]:5.1f}",
        f"old {old:5.1f}" if old is not None else "old   -  ",
        f"new {metrics['new_accuracy'][-1]:5.1f}",
    ]
    diagnostics = record.get("diagnostics")
    if diagnostics:
        parts.append(
            f"align {diagnostics['mean_cosine_before']:.3f}->{diagnostics['mean_cosine_after']:.3f}"
        )
    parts.append(f"(learn {seconds['learn']:.1f} s, eval {seconds['evaluate']:.1f} s)")
    return "  ".join(parts)


def differences(saved: Any, current: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        diffs = []
        for key in sorted(set(saved) | set(current), key=str):
            diffs += differences(saved.get(key), current.get(key), f"{path}{key}.")
        return diffs
    return [] if saved == current else [f"{path.rstrip('.')}: {saved!r} -> {current!r}"]
