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


def confusion(classes: list[str], predicted: list[str], counts: list[list[int]]) -> bytes:
    """An evaluation's confusion counts: true classes down, predicted classes across."""
    side = max(3.0, 0.45 * len(predicted) + 1.5)
    figure, axes = plt.subplots(figsize=(side + 1.0, max(2.5, 0.45 * len(classes) + 1.5)))
    image = axes.imshow(counts, cmap="Blues", aspect="auto")
    axes.set_xticks(range(len(predicted)), predicted, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), classes)
    if len(classes) <= 30:
        peak = max((max(row) for row in counts if row), default=0)
        for i, row in enumerate(counts):
            for j, value in enumerate(row):
                if value:
                    colour = "white" if value > peak / 2 else "black"
                    axes.text(j, i, str(value), ha="center", va="center", color=colour)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true class")
    axes.set_title("Confusion on the evaluation set")
    figure.colorbar(image, ax=axes)
    return _png(figure)
