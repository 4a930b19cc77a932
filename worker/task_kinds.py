"""What a job does to the learner, by task kind: a registry, so a new kind is one entry.

Every kind turns the learner of the version the task builds on into the learner of the
new version; `Learner` does the work (`dmc_core.learner`), this says which method, whether
the task has uploaded images, and which progress stages it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from dmc_core.learner import Learner, ProgressCallback
from store.models import TaskKind
from store.tasks import TaskInfo
from worker.progress import learning_stages

# (learner, task, images, labels, progress) -> the report for the version's metrics.
Apply = Callable[
    [Learner, TaskInfo, Sequence[Any], Sequence[int], ProgressCallback], dict[str, Any]
]


@dataclass(frozen=True)
class TaskKindSpec:
    apply: Apply
    # Whether the task uploads images (its job reads and decodes them).
    needs_images: bool
    stages: Callable[[Learner], list[str]]


def _add(
    learner: Learner,
    task: TaskInfo,
    images: Sequence[Any],
    labels: Sequence[int],
    progress: ProgressCallback,
) -> dict[str, Any]:
    return learner.learn_task(images, labels, task.class_names, progress=progress).to_dict()


def _extend(
    learner: Learner,
    task: TaskInfo,
    images: Sequence[Any],
    labels: Sequence[int],
    progress: ProgressCallback,
) -> dict[str, Any]:
    return learner.extend_classes(images, labels, task.class_names, progress=progress).to_dict()


def _remove(
    learner: Learner,
    task: TaskInfo,
    images: Sequence[Any],
    labels: Sequence[int],
    progress: ProgressCallback,
) -> dict[str, Any]:
    learner.remove_classes(task.class_names)
    return {"removed": list(task.class_names)}


def _rename(
    learner: Learner,
    task: TaskInfo,
    images: Sequence[Any],
    labels: Sequence[int],
    progress: ProgressCallback,
) -> dict[str, Any]:
    new = str((task.arguments or {})["name"])
    learner.rename_class(task.class_names[0], new)
    return {"renamed": {task.class_names[0]: new}}


def _no_stages(learner: Learner) -> list[str]:
    return []


TASK_KINDS: dict[TaskKind, TaskKindSpec] = {
    TaskKind.ADD: TaskKindSpec(_add, needs_images=True, stages=learning_stages),
    # Extending runs the same stages as learning new classes.
    TaskKind.EXTEND: TaskKindSpec(_extend, needs_images=True, stages=learning_stages),
    TaskKind.REMOVE: TaskKindSpec(_remove, needs_images=False, stages=_no_stages),
    TaskKind.RENAME: TaskKindSpec(_rename, needs_images=False, stages=_no_stages),
}
