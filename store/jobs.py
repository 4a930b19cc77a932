"""Tasks (uploads) and their jobs: creation with idempotency keys, state and progress."""

from __future__ import annotations

import builtins
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import (
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    LeaseLostError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from store.models import Job, JobState, Task, Version, utcnow


@dataclass(frozen=True)
class Progress:
    stage: str = ""
    step: int = 0
    total: int = 0
    percent: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "step": self.step,
            "total": self.total,
            "percent": self.percent,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Progress:
        data = data or {}
        return cls(
            stage=str(data.get("stage", "")),
            step=int(data.get("step", 0)),
            total=int(data.get("total", 0)),
            percent=float(data.get("percent", 0.0)),
        )


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


@dataclass(frozen=True)
class JobInfo:
    id: int
    task_id: int
    state: JobState
    progress: Progress
    error: str | None
    attempts: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    version_id: int | None
    # While running: until when the runner's heartbeat vouches for it. `worker`: who
    # made the latest run.
    lease_expires_at: datetime | None = None
    worker: str | None = None


@dataclass(frozen=True)
class Submission:
    task: TaskInfo
    job: JobInfo
    # False when the idempotency key was seen before: task and job are the earlier ones,
    # and the caller should discard the uploads it saved for this request.
    created: bool


class Jobs:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- tasks -----------------------------------------------------------------------

    def submit(
        self,
        *,
        class_names: Sequence[str],
        image_counts: Sequence[int],
        uploads_location: str | None = None,
        idempotency_key: str | None = None,
        activate: bool = True,
        payload_digest: str | None = None,
    ) -> Submission:
        """Record a task (one upload) and its queued job.

        With an `idempotency_key` seen before, returns the earlier task and job
        (`created=False`), or raises `IdempotencyConflictError` if the classes, image
        counts or (when both were recorded) `payload_digest`s differ. `activate=False` asks
        that the version learned from it is published but not made `active`.
        """
        names, counts = _validate_task(class_names, image_counts, idempotency_key)
        if payload_digest is not None and not 1 <= len(payload_digest) <= 64:
            raise ValueError("a payload digest is 1 to 64 characters (a sha256 in hex)")
        if idempotency_key is not None:
            earlier = self._replay(idempotency_key, names, counts, payload_digest)
            if earlier is not None:
                return earlier
        try:
            with self.db.write() as session:
                task = Task(
                    idempotency_key=idempotency_key,
                    class_names=list(names),
                    image_counts=list(counts),
                    uploads_location=uploads_location,
                    created_at=utcnow(),
                    activate=bool(activate),
                    payload_digest=payload_digest,
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
                return Submission(_task_info(task), _job_info(job), created=True)
        except IntegrityError:
            # Another request with the same key committed first.
            if idempotency_key is not None:
                earlier = self._replay(idempotency_key, names, counts, payload_digest)
                if earlier is not None:
                    return earlier
            raise

    def _replay(
        self,
        key: str,
        names: tuple[str, ...],
        counts: tuple[int, ...],
        digest: str | None = None,
    ) -> Submission | None:
        with self.db.read() as session:
            task = session.scalar(select(Task).where(Task.idempotency_key == key))
            if task is None:
                return None
            if tuple(task.class_names) != names or tuple(task.image_counts) != counts:
                raise IdempotencyConflictError(key, task.id)
            if None not in (digest, task.payload_digest) and digest != task.payload_digest:
                raise IdempotencyConflictError(key, task.id)
            job = session.scalar(
                select(Job).where(Job.task_id == task.id).order_by(Job.id.desc()).limit(1)
            )
            if job is None:
                raise RuntimeError(f"task {task.id} has no job")
            return Submission(_task_info(task), _job_info(job), created=False)

    def get_task(self, task_id: int) -> TaskInfo:
        with self.db.read() as session:
            task = session.get(Task, task_id)
            if task is None:
                raise TaskNotFoundError(task_id)
            return _task_info(task)

    def set_uploads_location(self, task_id: int, location: str | None) -> TaskInfo:
        with self.db.write() as session:
            task = session.get(Task, task_id)
            if task is None:
                raise TaskNotFoundError(task_id)
            task.uploads_location = location
            session.flush()
            return _task_info(task)

    def uploads_locations(self) -> set[str]:
        with self.db.read() as session:
            query = select(Task.uploads_location).where(Task.uploads_location.is_not(None))
            return {loc for loc in session.scalars(query) if loc is not None}

    # --- jobs ------------------------------------------------------------------------

    def get(self, job_id: int) -> JobInfo:
        with self.db.read() as session:
            job = session.get(Job, job_id)
            if job is None:
                raise JobNotFoundError(job_id)
            return _job_info(job)

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
            return [_job_info(job) for job in session.scalars(query)]

    def start(self, job_id: int) -> JobInfo:
        """Queued (or running, when a crashed worker's job is redelivered) -> running."""
        with self.db.write() as session:
            job = _locked(session, job_id, (JobState.QUEUED, JobState.RUNNING), "started")
            job.state = JobState.RUNNING
            job.attempts += 1
            job.started_at = utcnow()
            job.error = None
            session.flush()
            return _job_info(job)

    def report_progress(
        self, job_id: int, *, stage: str, step: int, total: int, percent: float | None = None
    ) -> JobInfo:
        """Record progress of a running job. `percent` (default step/total) never goes down:
        pass the overall percentage when a job has several stages."""
        update = _progress_update(stage, step, total, percent)
        with self.db.write() as session:
            job = _locked(session, job_id, (JobState.RUNNING,), "given progress")
            _apply_progress(job, update)
            session.flush()
            return _job_info(job)

    def succeed(self, job_id: int, version_id: int, *, attempt: int | None = None) -> JobInfo:
        with self.db.write() as session:
            return self.succeed_in(session, job_id, version_id, attempt=attempt)

    def succeed_in(
        self, session: Session, job_id: int, version_id: int, *, attempt: int | None = None
    ) -> JobInfo:
        """`succeed` inside the caller's transaction, e.g. the one that publishes the
        version (`Registry.publish(..., finalize=...)`), so both commit or neither does.
        With `attempt`, refused (`LeaseLostError`) unless that run is still the current one."""
        job = _locked(session, job_id, (JobState.RUNNING,), "marked succeeded", attempt=attempt)
        if session.get(Version, version_id) is None:
            raise VersionNotFoundError(version_id)
        current = Progress.from_json(job.progress)
        job.state = JobState.SUCCEEDED
        job.version_id = version_id
        job.finished_at = utcnow()
        job.lease_expires_at = None
        job.progress = Progress(current.stage, current.total, current.total, 100.0).as_json()
        session.flush()
        return _job_info(job)

    def fail(self, job_id: int, error: str, *, attempt: int | None = None) -> JobInfo:
        """Queued or running -> failed with `error` (a message for the user). With `attempt`,
        refused (`LeaseLostError`) unless that run is still the current one."""
        with self.db.write() as session:
            job = _locked(
                session,
                job_id,
                (JobState.QUEUED, JobState.RUNNING),
                "marked failed",
                attempt=attempt,
            )
            job.state = JobState.FAILED
            job.error = error
            job.finished_at = utcnow()
            job.lease_expires_at = None
            session.flush()
            return _job_info(job)

    # --- runs: claiming, heartbeats, recovery (for the worker) -------------------------

    def claim_next(self, *, worker: str, lease_seconds: float) -> JobInfo | None:
        """Start the oldest queued job: queued -> running, `attempts` + 1, a lease of
        `lease_seconds`; None if no job is queued.

        The returned `attempts` is the run's fencing token: `renew`, `succeed_in`, `fail`
        and `requeue` given that `attempt` are refused once another run has claimed the
        job. Callers serialise claims themselves (the worker holds its update lock), so
        that a job only starts once the one before it has finished.
        """
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        with self.db.write() as session:
            job = session.scalar(
                select(Job)
                .where(Job.state == JobState.QUEUED)
                .order_by(Job.id)
                .limit(1)
                .with_for_update()
            )
            if job is None:
                return None
            now = utcnow()
            job.state = JobState.RUNNING
            job.attempts += 1
            job.started_at = now
            job.error = None
            job.lease_expires_at = now + timedelta(seconds=lease_seconds)
            job.worker = worker[:200]
            session.flush()
            return _job_info(job)

    def renew(
        self,
        job_id: int,
        *,
        attempt: int,
        lease_seconds: float,
        stage: str | None = None,
        step: int = 0,
        total: int = 0,
        percent: float | None = None,
    ) -> JobInfo:
        """The heartbeat of a running job: extend its lease and, with `stage`, record its
        progress (as `report_progress`). Raises `JobStateError` if the job was cancelled
        (the runner must stop) and `LeaseLostError` if this run is no longer the current
        one (another run claimed it, or it was requeued or failed by the recovery)."""
        update = None if stage is None else _progress_update(stage, step, total, percent)
        with self.db.write() as session:
            job = _locked(session, job_id, (JobState.RUNNING,), "given progress", attempt=attempt)
            if update is not None:
                _apply_progress(job, update)
            job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
            session.flush()
            return _job_info(job)

    def requeue(self, job_id: int, *, attempt: int) -> bool:
        """Running -> queued, for a runner that stops before finishing (it is shutting
        down); False if run `attempt` is no longer the current one. Progress is kept."""
        with self.db.write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.state != JobState.RUNNING or job.attempts != attempt:
                return False
            _to_queue(job)
            session.flush()
            return True

    def requeue_expired(self, *, max_attempts: int | None = None) -> builtins.list[JobInfo]:
        """Recover running jobs whose lease has expired (their runner died): back to
        queued, or failed once they have been attempted `max_attempts` times. Returns the
        jobs changed. Call it only while no job can be running elsewhere (the worker holds
        its update lock)."""
        now = utcnow()
        changed: builtins.list[JobInfo] = []
        with self.db.write() as session:
            stale = session.scalars(
                select(Job)
                .where(
                    Job.state == JobState.RUNNING,
                    or_(Job.lease_expires_at.is_(None), Job.lease_expires_at < now),
                )
                .order_by(Job.id)
                .with_for_update()
            ).all()
            for job in stale:
                if max_attempts is not None and job.attempts >= max_attempts:
                    job.state = JobState.FAILED
                    job.error = (
                        f"the worker stopped {job.attempts} times while running this job "
                        "(killed, out of memory, or cut off from the database); it is not "
                        "retried again. See the worker logs, then upload the task again."
                    )
                    job.finished_at = now
                    job.lease_expires_at = None
                else:
                    _to_queue(job)
                changed.append(_job_info(job))
            session.flush()
        return changed

    def has_pending(self) -> bool:
        """Whether a job is queued or running."""
        pending = (JobState.QUEUED, JobState.RUNNING)
        with self.db.read() as session:
            return bool(session.scalar(select(exists().where(Job.state.in_(pending)))))

    def finished_tasks_with_uploads(self) -> builtins.list[int]:
        """Tasks that still reference uploads although none of their jobs is queued or
        running (their runner stopped between finishing and releasing the uploads)."""
        pending = (JobState.QUEUED, JobState.RUNNING)
        open_job = exists().where(Job.task_id == Task.id, Job.state.in_(pending))
        query = (
            select(Task.id)
            .where(Task.uploads_location.is_not(None), ~open_job)
            .where(exists().where(Job.task_id == Task.id))
            .order_by(Task.id)
        )
        with self.db.read() as session:
            return builtins.list(session.scalars(query))

    def cancel(self, job_id: int) -> JobInfo:
        """Queued or running -> cancelled; a running worker sees it and stops."""
        with self.db.write() as session:
            job = _locked(session, job_id, (JobState.QUEUED, JobState.RUNNING), "cancelled")
            job.state = JobState.CANCELLED
            job.finished_at = utcnow()
            job.lease_expires_at = None
            session.flush()
            return _job_info(job)


def _locked(
    session: Session,
    job_id: int,
    allowed: Sequence[JobState],
    action: str,
    *,
    attempt: int | None = None,
) -> Job:
    job = session.get(Job, job_id, with_for_update=True)
    if job is None:
        raise JobNotFoundError(job_id)
    if attempt is not None and job.attempts != attempt:
        raise LeaseLostError(job_id, attempt, job.attempts)
    if job.state not in allowed:
        if attempt is not None and job.state != JobState.CANCELLED:
            # Requeued or failed by the recovery: this run no longer owns the job.
            raise LeaseLostError(job_id, attempt, job.attempts)
        raise JobStateError(job_id, job.state.value, action)
    return job


def _to_queue(job: Job) -> None:
    job.state = JobState.QUEUED
    job.lease_expires_at = None


def _progress_update(stage: str, step: int, total: int, percent: float | None) -> Progress:
    if total < 0 or step < 0:
        raise ValueError("step and total are counts, not negative")
    if percent is None:
        percent = 100.0 * step / total if total else 0.0
    return Progress(stage=stage, step=step, total=total, percent=float(percent))


def _apply_progress(job: Job, update: Progress) -> None:
    current = Progress.from_json(job.progress)
    job.progress = Progress(
        stage=update.stage,
        step=update.step,
        total=update.total,
        percent=max(current.percent, min(100.0, max(0.0, update.percent))),
    ).as_json()


def _validate_task(
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
    if any(not n.strip() or len(n) > 200 for n in names):
        raise ValueError("class names are 1 to 200 characters, not blank")
    if any(c < 1 for c in counts):
        raise ValueError("every class needs at least one image")
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise ValueError("an idempotency key is 1 to 200 characters")
    return names, counts


def _task_info(task: Task) -> TaskInfo:
    return TaskInfo(
        id=task.id,
        idempotency_key=task.idempotency_key,
        class_names=tuple(task.class_names),
        image_counts=tuple(task.image_counts),
        uploads_location=task.uploads_location,
        created_at=task.created_at,
        activate=bool(task.activate),
        payload_digest=task.payload_digest,
    )


def _job_info(job: Job) -> JobInfo:
    return JobInfo(
        id=job.id,
        task_id=job.task_id,
        state=JobState(job.state),
        progress=Progress.from_json(job.progress),
        error=job.error,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        version_id=job.version_id,
        lease_expires_at=job.lease_expires_at,
        worker=job.worker,
    )
