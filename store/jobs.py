"""Jobs: the background run that turns a task (one upload) into a version. A task and its
queued job are created together, with idempotency keys; then the job's state and progress.

The tasks' records and class queries are in `store.tasks` (`Jobs.tasks`), the worker's
claims, leases and recovery in `store.leases`, the job row helpers in `store.job_rows`.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import (
    IdempotencyConflictError,
    JobNotFoundError,
    StoreError,
    VersionNotFoundError,
)
from store.job_rows import (
    JobInfo,
    Progress,
    apply_progress,
    job_info,
    locked_job,
    progress_update,
)
from store.leases import JobLeases
from store.models import PENDING_STATES, Job, JobState, Task, TaskKind, Version, utcnow
from store.tasks import TaskInfo, Tasks, check_classes, task_info, validate_task

__all__ = ["JobInfo", "Jobs", "Progress", "Submission", "TaskInfo"]


@dataclass(frozen=True)
class Submission:
    task: TaskInfo
    job: JobInfo
    # False when the idempotency key was seen before: task and job are the earlier ones,
    # and the caller should discard the uploads it saved for this request.
    created: bool


class Jobs(JobLeases):
    def __init__(self, db: Database) -> None:
        self.db = db
        self.tasks = Tasks(db)

    def submit(
        self,
        *,
        class_names: Sequence[str],
        image_counts: Sequence[int],
        uploads_location: str | None = None,
        idempotency_key: str | None = None,
        activate: bool = True,
        payload_digest: str | None = None,
        refuse_taken_classes: bool = False,
        gate: Mapping[str, Any] | None = None,
        kind: TaskKind = TaskKind.ADD,
        base_version_id: int | None = None,
        arguments: Mapping[str, Any] | None = None,
    ) -> Submission:
        """Record a task and its queued job: new classes (`kind` add), more images of
        known ones (extend), a removal or a rename (`arguments={"name": new name}`),
        built on `base_version_id` or, when None, on the version active when the job
        starts.

        With an `idempotency_key` seen before, returns the earlier task and job
        (`created=False`), or raises `IdempotencyConflictError` if the kind, classes,
        arguments, base, image counts or (when both were recorded) `payload_digest`s
        differ. With `refuse_taken_classes`, the classes must fit the base version
        (`store.tasks.check_classes`), checked after the key, so a replay is never refused.
        `activate=False` asks that the version learned from it is published but not made
        `active`; `gate` is the upload's promotion gate (`store.evaluations.GateRule`
        as JSON) in place of the settings'.

        The key lookup, the class check and the insert are one transaction, and
        submitters take turns (a lock on the tasks table), so concurrent submissions of
        one key from any number of processes all get the first one's answer.
        """
        kind = TaskKind(kind)
        names, counts = validate_task(class_names, image_counts, idempotency_key, kind, arguments)
        if payload_digest is not None and not 1 <= len(payload_digest) <= 64:
            raise ValueError("a payload digest is 1 to 64 characters (a sha256 in hex)")
        what = _Identity(kind, names, counts, payload_digest, base_version_id, arguments)
        with self.db.write() as session:
            self.db.lock_table(session, Task.__tablename__)
            if idempotency_key is not None:
                earlier = _replay(session, idempotency_key, what)
                if earlier is not None:
                    return earlier
            if refuse_taken_classes:
                check_classes(session, kind, names, arguments, base_version_id)
            task = Task(
                idempotency_key=idempotency_key,
                class_names=list(names),
                image_counts=list(counts),
                uploads_location=uploads_location,
                created_at=utcnow(),
                activate=bool(activate),
                payload_digest=payload_digest,
                gate=dict(gate) if gate is not None else None,
                kind=kind,
                base_version_id=base_version_id,
                arguments=dict(arguments) if arguments is not None else None,
            )
            session.add(task)
            session.flush()
            job = Job(
                task_id=task.id,
                state=JobState.QUEUED,
                progress=Progress().as_json(),
                attempts=0,
                created_at=utcnow(),
            )
            session.add(job)
            session.flush()
            return Submission(task_info(task), job_info(job), created=True)

    def replay(
        self,
        key: str,
        names: Iterable[str],
        counts: Iterable[int],
        digest: str | None = None,
    ) -> Submission | None:
        """The task and newest job of idempotency key `key` (None if the key is new);
        `IdempotencyConflictError` if that task has other classes, image counts or (when
        both were recorded) images."""
        what = _Identity(TaskKind.ADD, tuple(names), tuple(counts), digest, None, None)
        with self.db.read() as session:
            return _replay(session, key, what)

    def precheck(
        self,
        key: str | None,
        names: Sequence[str],
        counts: Sequence[int],
        digest: str | None,
        *,
        kind: TaskKind = TaskKind.ADD,
        base_version_id: int | None = None,
        arguments: Mapping[str, Any] | None = None,
    ) -> Submission | None:
        """What `submit(..., refuse_taken_classes=True)` would answer without storing
        anything: the earlier submission of `key`, None for a new task, or the errors.
        A cheap check before the uploads are saved; `submit` decides for good."""
        what = _Identity(kind, tuple(names), tuple(counts), digest, base_version_id, arguments)
        with self.db.read() as session:
            # Classes first, key second: a submission of this key that commits in between
            # is then seen by the key lookup, and is replayed rather than refused.
            try:
                check_classes(session, kind, names, arguments, base_version_id)
                refused: Exception | None = None
            except (StoreError, LookupError) as error:
                refused = error
            if key is not None:
                earlier = _replay(session, key, what)
                if earlier is not None:
                    return earlier
        if refused is not None:
            raise refused
        return None

    def get(self, job_id: int) -> JobInfo:
        with self.db.read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            return job_info(job)

    def list(
        self,
        *,
        states: Iterable[JobState] | None = None,
        task_id: int | None = None,
        limit: int | None = 100,
        offset: int = 0,
    ) -> builtins.list[JobInfo]:
        """Jobs, newest first."""
        query = select(Job).order_by(Job.id.desc()).offset(offset).limit(limit)
        if states is not None:
            query = query.where(Job.state.in_(builtins.list(states)))
        if task_id is not None:
            query = query.where(Job.task_id == task_id)
        with self.db.read() as session:
            return [job_info(job) for job in session.scalars(query)]

    def counts(self) -> dict[str, int]:
        """The number of jobs in each state that has any."""
        query = select(Job.state, func.count()).group_by(Job.state)
        with self.db.read() as session:
            return {JobState(state).value: int(count) for state, count in session.execute(query)}

    def has_pending(self) -> bool:
        """Whether a job is queued or running."""
        with self.db.read() as session:
            return bool(session.scalar(select(exists().where(Job.state.in_(PENDING_STATES)))))

    def start(self, job_id: int) -> JobInfo:
        """Queued (or running, when a crashed worker's job is redelivered) -> running."""
        with self.db.write() as session:
            job = locked_job(session, job_id, PENDING_STATES, "started")
            job.state = JobState.RUNNING
            job.attempts += 1
            job.started_at = utcnow()
            job.error = None
            job.progress = Progress().as_json()
            session.flush()
            return job_info(job)

    def report_progress(
        self, job_id: int, *, stage: str, step: int, total: int, percent: float | None = None
    ) -> JobInfo:
        """Record progress of a running job. `percent` (default step/total) never goes down:
        pass the overall percentage when a job has several stages."""
        update = progress_update(stage, step, total, percent)
        with self.db.write() as session:
            job = locked_job(session, job_id, (JobState.RUNNING,), "given progress")
            apply_progress(job, update)
            session.flush()
            return job_info(job)

    def succeed(self, job_id: int, version_id: int, *, attempt: int | None = None) -> JobInfo:
        with self.db.write() as session:
            return self.succeed_in(session, job_id, version_id, attempt=attempt)

    def succeed_in(
        self,
        session: Session,
        job_id: int,
        version_id: int,
        *,
        attempt: int | None = None,
        note: str | None = None,
    ) -> JobInfo:
        """`succeed` inside the caller's transaction, e.g. the one that publishes the
        version (`Registry.publish(..., finalize=...)`), so both commit or neither does.
        With `attempt`, refused (`LeaseLostError`) unless that run is still the current one.
        `note`: what the job should tell beyond its version (e.g. why it is not active)."""
        job = locked_job(session, job_id, (JobState.RUNNING,), "marked succeeded", attempt=attempt)
        if session.get(Version, version_id) is None:
            raise VersionNotFoundError(version_id)
        current = Progress.from_json(job.progress)
        job.state = JobState.SUCCEEDED
        job.version_id = version_id
        job.note = note
        job.finished_at = utcnow()
        job.lease_expires_at = None
        job.progress = Progress(current.stage, current.total, current.total, 100.0).as_json()
        session.flush()
        return job_info(job)

    def fail(self, job_id: int, error: str, *, attempt: int | None = None) -> JobInfo:
        """Queued or running -> failed with `error` (a message for the user). With `attempt`,
        refused (`LeaseLostError`) unless that run is still the current one."""
        with self.db.write() as session:
            job = locked_job(session, job_id, PENDING_STATES, "marked failed", attempt=attempt)
            job.state = JobState.FAILED
            job.error = error
            job.finished_at = utcnow()
            job.lease_expires_at = None
            session.flush()
            return job_info(job)

    def cancel(self, job_id: int) -> JobInfo:
        """Queued or running -> cancelled; a running worker sees it and stops."""
        with self.db.write() as session:
            job = locked_job(session, job_id, PENDING_STATES, "cancelled")
            job.state = JobState.CANCELLED
            job.finished_at = utcnow()
            job.lease_expires_at = None
            session.flush()
            return job_info(job)


@dataclass(frozen=True)
class _Identity:
    """What a replay of an idempotency key must repeat."""

    kind: TaskKind
    names: tuple[str, ...]
    counts: tuple[int, ...]
    digest: str | None
    base_version_id: int | None
    arguments: Mapping[str, Any] | None


def _replay(session: Session, key: str, what: _Identity) -> Submission | None:
    task = session.scalar(select(Task).where(Task.idempotency_key == key))
    if task is None:
        return None
    same = (
        TaskKind(task.kind) == what.kind
        and tuple(task.class_names) == what.names
        and tuple(task.image_counts) == what.counts
        and task.base_version_id == what.base_version_id
        and (task.arguments or None) == (dict(what.arguments) if what.arguments else None)
    )
    if not same:
        raise IdempotencyConflictError(key, task.id)
    if None not in (what.digest, task.payload_digest) and what.digest != task.payload_digest:
        raise IdempotencyConflictError(key, task.id)
    job = session.scalar(select(Job).where(Job.task_id == task.id).order_by(Job.id.desc()).limit(1))
    if job is None:
        raise RuntimeError(f"task {task.id} has no job")
    return Submission(task_info(task), job_info(job), created=False)
