"""The runs of jobs, for the worker: claiming the next queued job with a lease,
heartbeats that renew it, and the recovery of jobs whose runner died."""

from __future__ import annotations

import builtins
from datetime import timedelta

from sqlalchemy import exists, or_, select

from store.db import Database
from store.errors import JobNotFoundError
from store.job_rows import (
    JobInfo,
    Progress,
    apply_progress,
    job_info,
    locked_job,
    progress_update,
    to_queue,
)
from store.models import PENDING_STATES, Job, JobState, Task, utcnow
from store.names import MAX_NAME_LENGTH


class JobLeases:
    """The part of `Jobs` that the worker's runs use (see `Jobs`)."""

    db: Database

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
            job.worker = worker[:MAX_NAME_LENGTH]
            # A run again (its runner died or stopped) starts from nothing, not from the
            # progress of the run before.
            job.progress = Progress().as_json()
            session.flush()
            return job_info(job)

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
        update = None if stage is None else progress_update(stage, step, total, percent)
        with self.db.write() as session:
            job = locked_job(
                session, job_id, (JobState.RUNNING,), "given progress", attempt=attempt
            )
            if update is not None:
                apply_progress(job, update)
            job.lease_expires_at = utcnow() + timedelta(seconds=lease_seconds)
            session.flush()
            return job_info(job)

    def requeue(self, job_id: int, *, attempt: int) -> bool:
        """Running -> queued, for a runner that stops before finishing (it is shutting
        down); False if run `attempt` is no longer the current one. Progress is kept."""
        with self.db.write() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None:
                raise JobNotFoundError(job_id)
            if job.state != JobState.RUNNING or job.attempts != attempt:
                return False
            to_queue(job)
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
                    to_queue(job)
                changed.append(job_info(job))
            session.flush()
        return changed

    def finished_tasks_with_uploads(self) -> builtins.list[int]:
        """Tasks that still reference uploads although none of their jobs is queued or
        running (their runner stopped between finishing and releasing the uploads)."""
        open_job = exists().where(Job.task_id == Task.id, Job.state.in_(PENDING_STATES))
        query = (
            select(Task.id)
            .where(Task.uploads_location.is_not(None), ~open_job)
            .where(exists().where(Job.task_id == Task.id))
            .order_by(Task.id)
        )
        with self.db.read() as session:
            return builtins.list(session.scalars(query))
