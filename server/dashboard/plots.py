"""PNG plots of a version's metrics (matplotlib, no display)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def accuracy_per_task(tasks: list[int], accuracy: list[float | None]) -> bytes:
    """Training accuracy of each task of a version's lineage, when it was learned."""
    figure, axes = plt.subplots(figsize=(6, 3))
    values = [a if a is not None else 0.0 for a in accuracy]
    axes.plot(tasks, values, marker="o")
    axes.set_xticks(tasks)
    axes.set_ylim(0, 1.05)
    axes.set_xlabel("task")
    axes.set_ylabel("train accuracy")
    axes.set_title("Accuracy per task (at learning time)")
    axes.grid(alpha=0.3)
    return _png(figure)


def calibration_shift(classes: list[str], mean_shift: list[float]) -> bytes:
    """How far DMC-OT's calibration moved each old class's mean."""
    figure, axes = plt.subplots(figsize=(6, 3))
    axes.bar(range(len(classes)), mean_shift)
    axes.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    axes.set_ylabel("mean shift (L2)")
    axes.set_title("Calibration of old classes")
    axes.grid(alpha=0.3, axis="y")
    return _png(figure)
