"""What the dashboard shows of a version's evaluations: the gate's decision and, per
evaluation set, the classes that got worse most against the parent."""

from __future__ import annotations

from typing import Any

from store.evaluations import EvaluationInfo
from store.registry import VersionInfo

# How many of the classes that got worse most a version's page lists.
WORST_SHOWN = 5


def worst_classes(evaluation: EvaluationInfo, count: int = WORST_SHOWN) -> list[dict[str, Any]]:
    """The classes whose accuracy fell most against the parent (only those that fell);
    without a parent, the least accurate ones."""
    rows = evaluation.results["per_class"]
    compared = [r for r in rows if r["change"] is not None]
    if compared:
        fell = sorted((r for r in compared if r["change"] < 0), key=lambda r: r["change"])
        return fell[:count]
    return sorted(rows, key=lambda r: r["accuracy"] if r["accuracy"] is not None else 0)[:count]


def version_context(version: VersionInfo, evaluations: list[EvaluationInfo]) -> dict[str, Any]:
    """What the version page shows of its evaluations and the gate's decision."""
    return {
        "evaluations": [(e, worst_classes(e)) for e in evaluations],
        "gate": version.metrics.get("gate"),
    }
