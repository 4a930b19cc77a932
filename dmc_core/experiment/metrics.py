"""Class-incremental metrics from per-task correct counts.

`correct[t][j]` is how many test images of task j were classified right after learning
task t (over all classes seen so far; j <= t), `counts[j]` how many test images task j
has. All accuracies are percentages.

- accuracy matrix `acc[t][j] = 100 * correct[t][j] / counts[j]` (None for j > t);
- `A_t` (accuracy after task t): over all test images of the tasks seen so far;
- `Avg = mean_t A_t`, `Last = A_T`;
- `forgetting` (Chaudhry et al. 2018): for each task j before the last,
  `f_j = max_{j <= t < T} acc[t][j] - acc[T][j]` (best accuracy before the final task minus
  the final one; negative when a task got better); forgetting = mean of f_j (None if T = 1);
- `forgetting_pycil` (PyCIL's): the same with the best taken over every row including the
  last, `max_{j <= t <= T} acc[t][j] - acc[T][j]`, so never negative;
- old / new accuracy after task t: over the test images of tasks < t / of task t.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["accuracy_matrix", "aggregate", "compute_metrics", "mean_std"]


def _check(correct: Sequence[Sequence[int]], counts: Sequence[int]) -> None:
    if len(correct) > len(counts):
        raise ValueError(f"{len(correct)} rows of correct counts but {len(counts)} tasks")
    for t, row in enumerate(correct):
        if len(row) != t + 1:
            raise ValueError(f"row {t} of correct counts must have {t + 1} entries, has {len(row)}")
        for j, value in enumerate(row):
            if not 0 <= value <= counts[j]:
                raise ValueError(f"correct[{t}][{j}] = {value} is not in [0, {counts[j]}]")
    if any(n <= 0 for n in counts):
        raise ValueError("every task needs at least one test image")


def _percent(correct: int, total: int) -> float:
    return 100.0 * correct / total


def accuracy_matrix(
    correct: Sequence[Sequence[int]], counts: Sequence[int]
) -> list[list[float | None]]:
    """acc[t][j] in percent, None where task j comes after task t."""
    _check(correct, counts)
    n = len(correct)
    return [
        [_percent(row[j], counts[j]) if j <= t else None for j in range(n)]
        for t, row in enumerate(correct)
    ]


def compute_metrics(correct: Sequence[Sequence[int]], counts: Sequence[int]) -> dict[str, Any]:
    """All metrics of the finished tasks (rows of `correct`)."""
    _check(correct, counts)
    acc = accuracy_matrix(correct, counts)
    accuracy, old, new = [], [], []
    for t, row in enumerate(correct):
        accuracy.append(_percent(sum(row), sum(counts[: t + 1])))
        new.append(_percent(row[t], counts[t]))
        old.append(_percent(sum(row[:t]), sum(counts[:t])) if t > 0 else None)
    n = len(correct)
    per_task_forgetting = _forgetting(acc, include_last=False)
    per_task_pycil = _forgetting(acc, include_last=True)
    return {
        "accuracy_per_task": accuracy,
        "avg": sum(accuracy) / n if n else None,
        "last": accuracy[-1] if n else None,
        "forgetting": _mean(per_task_forgetting),
        "forgetting_per_task": per_task_forgetting,
        "forgetting_pycil": _mean(per_task_pycil),
        "forgetting_pycil_per_task": per_task_pycil,
        "old_accuracy": old,
        "new_accuracy": new,
        "accuracy_matrix": acc,
    }


def _forgetting(acc: list[list[float | None]], include_last: bool) -> list[float]:
    """Per old task j: best accuracy over rows j.. (T - 1, or T with `include_last`) minus
    the final one."""
    n = len(acc)
    if n < 2:
        return []
    end = n if include_last else n - 1
    final = acc[n - 1]
    return [
        max(float(acc[t][j]) for t in range(j, end)) - float(final[j])  # type: ignore[arg-type]
        for j in range(n - 1)
    ]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def mean_std(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation (ddof=1; 0 for one value) of the non-None values."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return {"mean": None, "std": None, "n": 0, "values": list(values)}
    mean = sum(present) / len(present)
    var = sum((v - mean) ** 2 for v in present) / (len(present) - 1) if len(present) > 1 else 0.0
    return {"mean": mean, "std": math.sqrt(var), "n": len(present), "values": list(values)}


def aggregate(metrics: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean ± std over runs (seeds) of Avg, Last, both forgettings, the old / new accuracy
    after the last task and A_t per task."""
    n_tasks = max((len(m["accuracy_per_task"]) for m in metrics), default=0)
    return {
        "avg": mean_std([m["avg"] for m in metrics]),
        "last": mean_std([m["last"] for m in metrics]),
        "forgetting": mean_std([m["forgetting"] for m in metrics]),
        "forgetting_pycil": mean_std([m.get("forgetting_pycil") for m in metrics]),
        "old_accuracy_last": mean_std(
            [m["old_accuracy"][-1] for m in metrics if m["old_accuracy"]]
        ),
        "new_accuracy_last": mean_std(
            [m["new_accuracy"][-1] for m in metrics if m["new_accuracy"]]
        ),
        "accuracy_per_task": [
            mean_std(
                [
                    m["accuracy_per_task"][t] if t < len(m["accuracy_per_task"]) else None
                    for m in metrics
                ]
            )
            for t in range(n_tasks)
        ],
    }
