"""Read-only queries the HTTP API needs that the store's API does not offer: every class
with the task and version it arrived in, the classes of queued tasks, a task by its
idempotency key, and job counts by state. (Candidates to move into `store/`.)"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import func, select

from store.db import Database
from store.errors import IdempotencyConflictError
from store.jobs import JobInfo, Jobs, Submission
from store.models import ClassRecord, Job, JobState, Task

PENDING = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class ClassRow:
    name: str
    version_id: int
    task_id: int | None


def learned_classes(db: Database) -> list[ClassRow]:
    """Every class any version learned, by version then label order."""
    query = select(ClassRecord.name, ClassRecord.version_id, ClassRecord.task_id).order_by(
        ClassRecord.version_id, ClassRecord.ordinal
    )
    with db.read() as session:
        return [ClassRow(n, v, t) for n, v, t in session.execute(query)]


def pending_classes(db: Database) -> dict[str, int]:
    """Class name -> task id, for the tasks whose job is queued or running."""
    query = (
        select(Task.id, Task.class_names)
        .join(Job, Job.task_id == Task.id)
        .where(Job.state.in_(PENDING))
        .order_by(Task.id)
    )
    with db.read() as session:
        return {name: task_id for task_id, names in session.execute(query) for name in names}


def taken_class_names(db: Database, names: Iterable[str]) -> tuple[list[str], dict[str, int]]:
    """Of `names`: those a version has learned, and those a queued task brings (-> task id)."""
    wanted = list(names)
    with db.read() as session:
        learned = list(
            session.scalars(select(ClassRecord.name).where(ClassRecord.name.in_(wanted)))
        )
    pending = {n: t for n, t in pending_classes(db).items() if n in set(wanted)}
    return sorted(learned), pending


def find_submission(
    db: Database,
    jobs: Jobs,
    key: str,
    class_names: Iterable[str],
    image_counts: Iterable[int],
    digest: str,
) -> Submission | None:
    """The task and newest job of an idempotency key; `IdempotencyConflictError` if that
    task has other classes, image counts or images (as `Jobs.submit` decides)."""
    with db.read() as session:
        task_id = session.scalar(select(Task.id).where(Task.idempotency_key == key))
    if task_id is None:
        return None
    task = jobs.get_task(task_id)
    if (
        task.class_names != tuple(class_names)
        or task.image_counts != tuple(image_counts)
        or task.payload_digest not in (None, digest)
    ):
        raise IdempotencyConflictError(key, task.id)
    job: JobInfo | None = next(iter(jobs.list(task_id=task.id, limit=1)), None)
    if job is None:
        return None
    return Submission(task, job, created=False)


def job_counts(db: Database) -> dict[str, int]:
    query = select(Job.state, func.count()).group_by(Job.state)
    with db.read() as session:
        return {JobState(state).value: int(count) for state, count in session.execute(query)}
