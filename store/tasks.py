"""Tasks (uploads) and the queries about their classes: a task's record, the classes
every version learned, and the class names a new upload may not reuse."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import TaskNotFoundError
from store.models import PENDING_STATES, ClassRecord, Job, Task
from store.names import MAX_NAME_LENGTH, class_name_problem


@dataclass(frozen=True)
class TaskInfo:
    id: int
    idempotency_key: str | None
    class_names: tuple[str, ...]
    image_counts: tuple[int, ...]
    uploads_location: str | None
    created_at: datetime
    # Whether the version learned from this task becomes `active` when it is published.
    activate: bool = True
    # A digest of the uploaded images (see `Jobs.submit`); None when not recorded.
    payload_digest: str | None = None
    # The upload's promotion gate (`store.evaluations.GateRule` as JSON); None: the settings'.
    gate: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClassRow:
    """A learned class, with the version (and task) that introduced it."""

    name: str
    version_id: int
    task_id: int | None


class Tasks:
    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, task_id: int) -> TaskInfo:
        with self.db.read() as session:
            task = session.get(Task, task_id)
            if task is None:
                raise TaskNotFoundError(task_id)
            return task_info(task)

    def set_uploads_location(self, task_id: int, location: str | None) -> TaskInfo:
        with self.db.write() as session:
            task = session.get(Task, task_id)
            if task is None:
                raise TaskNotFoundError(task_id)
            task.uploads_location = location
            session.flush()
            return task_info(task)

    def uploads_locations(self) -> set[str]:
        with self.db.read() as session:
            query = select(Task.uploads_location).where(Task.uploads_location.is_not(None))
            return {loc for loc in session.scalars(query) if loc is not None}

    def learned_classes(self) -> list[ClassRow]:
        """Every class any version learned, by version then label order."""
        query = select(ClassRecord.name, ClassRecord.version_id, ClassRecord.task_id).order_by(
            ClassRecord.version_id, ClassRecord.ordinal
        )
        with self.db.read() as session:
            return [ClassRow(n, v, t) for n, v, t in session.execute(query)]

    def pending_classes(self) -> dict[str, int]:
        """Class name -> task id, for the tasks whose job is queued or running."""
        with self.db.read() as session:
            return _pending_classes(session)

    def taken_class_names(self, names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
        """Of `names`: those a version has learned, and those a queued task brings
        (-> task id)."""
        with self.db.read() as session:
            return taken_names(session, names)


def taken_names(session: Session, names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """`Tasks.taken_class_names` in the caller's transaction."""
    wanted = set(names)
    learned = learned_names(session, sorted(wanted))
    pending = {n: t for n, t in _pending_classes(session).items() if n in wanted}
    return sorted(learned), pending


def learned_names(session: Session, names: Sequence[str]) -> list[str]:
    """Those of `names` that a version has learned already."""
    return list(session.scalars(select(ClassRecord.name).where(ClassRecord.name.in_(names))))


def _pending_classes(session: Session) -> dict[str, int]:
    query = (
        select(Task.id, Task.class_names)
        .join(Job, Job.task_id == Task.id)
        .where(Job.state.in_(PENDING_STATES))
        .order_by(Task.id)
    )
    return {name: task_id for task_id, names in session.execute(query) for name in names}


def validate_task(
    class_names: Sequence[str], image_counts: Sequence[int], idempotency_key: str | None
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if isinstance(class_names, str):
        raise TypeError("class_names is a sequence of names, not one string")
    names = tuple(class_names)
    counts = tuple(int(c) for c in image_counts)
    if not names:
        raise ValueError("a task needs at least one class")
    if len(names) != len(counts):
        raise ValueError(f"{len(names)} class names but {len(counts)} image counts")
    if len(set(names)) != len(names):
        raise ValueError("class names in a task must be unique")
    for name in names:
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
    if any(c < 1 for c in counts):
        raise ValueError("every class needs at least one image")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= MAX_NAME_LENGTH:
        raise ValueError(f"an idempotency key is 1 to {MAX_NAME_LENGTH} characters")
    return names, counts


def task_info(task: Task) -> TaskInfo:
    return TaskInfo(
        id=task.id,
        idempotency_key=task.idempotency_key,
        class_names=tuple(task.class_names),
        image_counts=tuple(task.image_counts),
        uploads_location=task.uploads_location,
        created_at=task.created_at,
        activate=bool(task.activate),
        payload_digest=task.payload_digest,
        gate=dict(task.gate) if task.gate is not None else None,
    )
