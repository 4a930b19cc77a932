"""Tasks and the queries about their classes: a task's record, the version a task builds
on (`base_version`), and which class names a new task may use there (`check_classes`)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import (
    ClassBusyError,
    ClassesTakenError,
    ClassNotFoundError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from store.models import (
    ACTIVE_ALIAS,
    PENDING_STATES,
    Alias,
    ClassRecord,
    Job,
    Task,
    TaskKind,
    Version,
)
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
    kind: TaskKind = TaskKind.ADD
    # The version its job builds on; None: the one active when the job starts.
    base_version_id: int | None = None
    # Kind-specific arguments, e.g. {"name": new name} of a rename.
    arguments: dict[str, Any] | None = None


@dataclass(frozen=True)
class ClassRow:
    """A class of a version, with the version (and task) that introduced it."""

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

    def pending_classes(self) -> dict[str, int]:
        """Class name -> task id, for the names that queued or running tasks bring."""
        with self.db.read() as session:
            return _pending_classes(session)

    def taken_class_names(
        self, names: Iterable[str], base_version_id: int | None = None
    ) -> tuple[list[str], dict[str, int]]:
        """Of `names`: those the base version (default: the active one) has, and those a
        queued task brings (-> task id)."""
        with self.db.read() as session:
            return taken_names(session, names, base_version(session, base_version_id))


def base_version(session: Session, explicit: int | None) -> int | None:
    """The version a task builds on: `explicit` (which must exist), or the active one."""
    if explicit is not None:
        if session.get(Version, explicit) is None:
            raise VersionNotFoundError(explicit)
        return explicit
    return session.scalar(select(Alias.version_id).where(Alias.name == ACTIVE_ALIAS))


def version_class_names(session: Session, version_id: int | None) -> list[str]:
    if version_id is None:
        return []
    query = (
        select(ClassRecord.name)
        .where(ClassRecord.version_id == version_id)
        .order_by(ClassRecord.ordinal)
    )
    return list(session.scalars(query))


def taken_names(
    session: Session, names: Iterable[str], base_version_id: int | None
) -> tuple[list[str], dict[str, int]]:
    """`Tasks.taken_class_names` in the caller's transaction, on a resolved base."""
    wanted = set(names)
    learned = wanted & set(version_class_names(session, base_version_id))
    pending = {n: t for n, t in _pending_classes(session).items() if n in wanted}
    return sorted(learned), pending


def check_classes(
    session: Session,
    kind: TaskKind,
    names: Sequence[str],
    arguments: Mapping[str, Any] | None,
    base_version_id: int | None,
) -> None:
    """Refuse a task whose classes do not fit the version it builds on (explicit, or the
    active one): new names (an addition, a rename's new name) must be neither there nor
    brought by a queued task (`ClassesTakenError`); the classes extended, removed or
    renamed must be there (`ClassNotFoundError`) and not already being removed or renamed
    by a queued task (`ClassBusyError`)."""
    base = base_version(session, base_version_id)
    new = list(names) if kind == TaskKind.ADD else []
    if kind == TaskKind.RENAME:
        new = [str((arguments or {})["name"])]
    if kind != TaskKind.ADD:
        known = set(version_class_names(session, base))
        missing = [n for n in names if n not in known]
        if missing:
            raise ClassNotFoundError(missing, base)
        busy = {n: t for n, t in _pending_changes(session).items() if n in set(names)}
        if busy:
            raise ClassBusyError(busy)
    learned, pending = taken_names(session, new, base)
    if learned or pending:
        raise ClassesTakenError(learned, pending)


def _pending_changes(session: Session) -> dict[str, int]:
    """Class name -> task id, for the classes that queued or running tasks remove or rename."""
    query = (
        select(Task.id, Task.class_names)
        .join(Job, Job.task_id == Task.id)
        .where(Job.state.in_(PENDING_STATES), Task.kind.in_([TaskKind.REMOVE, TaskKind.RENAME]))
        .order_by(Task.id)
    )
    return {name: task_id for task_id, names in session.execute(query).tuples() for name in names}


def _pending_classes(session: Session) -> dict[str, int]:
    query = (
        select(Task.id, Task.kind, Task.class_names, Task.arguments)
        .join(Job, Job.task_id == Task.id)
        .where(Job.state.in_(PENDING_STATES), Task.kind.in_([TaskKind.ADD, TaskKind.RENAME]))
        .order_by(Task.id)
    )
    pending: dict[str, int] = {}
    for task_id, kind, names, arguments in session.execute(query).tuples():
        brought: list[str] = [arguments["name"]] if kind == TaskKind.RENAME and arguments else names
        pending.update({name: task_id for name in brought})
    return pending


def validate_task(
    class_names: Sequence[str],
    image_counts: Sequence[int],
    idempotency_key: str | None,
    kind: TaskKind = TaskKind.ADD,
    arguments: Mapping[str, Any] | None = None,
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A task's names and counts, checked for its kind: an addition or extension has
    images of each class; a removal names classes (no images); a rename names one class
    and gives its new name in `arguments["name"]`."""
    if isinstance(class_names, str):
        raise TypeError("class_names is a sequence of names, not one string")
    names = tuple(class_names)
    counts = tuple(int(c) for c in image_counts)
    if not names:
        raise ValueError("a task needs at least one class")
    if len(set(names)) != len(names):
        raise ValueError("class names in a task must be unique")
    new_names = list(names)
    if kind == TaskKind.RENAME:
        if len(names) != 1 or not isinstance((arguments or {}).get("name"), str):
            raise ValueError("a rename names one class and gives arguments {'name': new name}")
        new_names.append(str((arguments or {})["name"]))
    for name in new_names:
        problem = class_name_problem(name)
        if problem is not None:
            raise ValueError(problem)
    if kind in (TaskKind.ADD, TaskKind.EXTEND):
        if len(names) != len(counts):
            raise ValueError(f"{len(names)} class names but {len(counts)} image counts")
        if any(c < 1 for c in counts):
            raise ValueError("every class needs at least one image")
    elif counts:
        raise ValueError(f"a {kind.value} task has no images")
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
        kind=TaskKind(task.kind),
        base_version_id=task.base_version_id,
        arguments=dict(task.arguments) if task.arguments is not None else None,
    )
