"""A job's record (`JobInfo`, `Progress`) and the helpers that read and change its row,
shared by the job transitions (`store.jobs`) and the runs' leases (`store.leases`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from store.errors import JobNotFoundError, JobStateError, LeaseLostError
from store.models import Job, JobState


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
    # What a succeeded job tells beyond its version (why it was not activated).
    note: str | None = None


def locked_job(
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


def to_queue(job: Job) -> None:
    job.state = JobState.QUEUED
    job.lease_expires_at = None


def progress_update(stage: str, step: int, total: int, percent: float | None) -> Progress:
    if total < 0 or step < 0:
        raise ValueError("step and total are counts, not negative")
    if percent is None:
        percent = 100.0 * step / total if total else 0.0
    return Progress(stage=stage, step=step, total=total, percent=float(percent))


def apply_progress(job: Job, update: Progress) -> None:
    current = Progress.from_json(job.progress)
    job.progress = Progress(
        stage=update.stage,
        step=update.step,
        total=update.total,
        percent=max(current.percent, min(100.0, max(0.0, update.percent))),
    ).as_json()


def job_info(job: Job) -> JobInfo:
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
        note=job.note,
    )
