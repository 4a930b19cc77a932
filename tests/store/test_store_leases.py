"""Job runs for the worker: claiming in order, leases and fencing, recovery, and a
version published together with its job's success."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy.orm import Session

from store.db import Database
from store.errors import JobStateError, LeaseLostError
from store.jobs import JobInfo, Jobs, Progress
from store.models import JobState
from store.objects import LocalObjectStore
from store.registry import Registry, VersionInfo


@pytest.fixture
def jobs(db: Database) -> Jobs:
    return Jobs(db)


def queued(jobs: Jobs, name: str = "cat", *, activate: bool = True) -> JobInfo:
    return jobs.submit(class_names=[name], image_counts=[2], activate=activate).job


def test_task_remembers_whether_to_activate(jobs: Jobs) -> None:
    assert jobs.tasks.get(queued(jobs, "a").task_id).activate is True
    assert jobs.tasks.get(queued(jobs, "b", activate=False).task_id).activate is False


def test_claim_next_takes_the_oldest_queued_job(jobs: Jobs) -> None:
    first, second = queued(jobs, "a"), queued(jobs, "b")
    claimed = jobs.claim_next(worker="w1", lease_seconds=30)
    assert claimed is not None and claimed.id == first.id
    assert claimed.state is JobState.RUNNING
    assert claimed.attempts == 1
    assert claimed.worker == "w1"
    assert claimed.lease_expires_at is not None and claimed.started_at is not None
    again = jobs.claim_next(worker="w1", lease_seconds=30)
    assert again is not None and again.id == second.id
    assert jobs.claim_next(worker="w1", lease_seconds=30) is None
    with pytest.raises(ValueError):
        jobs.claim_next(worker="w1", lease_seconds=0)


def test_renew_extends_the_lease_and_records_progress(jobs: Jobs) -> None:
    queued(jobs)
    run = jobs.claim_next(worker="w", lease_seconds=1)
    assert run is not None and run.lease_expires_at is not None
    renewed = jobs.renew(run.id, attempt=run.attempts, lease_seconds=60)
    assert renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > run.lease_expires_at
    assert renewed.progress == run.progress
    info = jobs.renew(
        run.id, attempt=1, lease_seconds=60, stage="stage1", step=3, total=10, percent=40
    )
    assert (info.progress.stage, info.progress.step, info.progress.percent) == ("stage1", 3, 40)
    info = jobs.renew(run.id, attempt=1, lease_seconds=60, stage="stage2", step=1, total=10)
    assert info.progress.percent == 40  # never goes back


def test_a_cancelled_run_is_told_by_its_heartbeat(jobs: Jobs) -> None:
    queued(jobs)
    run = jobs.claim_next(worker="w", lease_seconds=30)
    assert run is not None
    jobs.cancel(run.id)
    with pytest.raises(JobStateError, match="cancelled"):
        jobs.renew(run.id, attempt=1, lease_seconds=30)
    with pytest.raises(JobStateError):
        jobs.fail(run.id, "boom", attempt=1)


def test_a_superseded_run_is_fenced_off(jobs: Jobs) -> None:
    queued(jobs)
    first = jobs.claim_next(worker="dead", lease_seconds=0.01)
    assert first is not None
    time.sleep(0.05)
    [recovered] = jobs.requeue_expired()
    assert recovered.state is JobState.QUEUED and recovered.worker == "dead"
    with pytest.raises(LeaseLostError):
        jobs.renew(first.id, attempt=1, lease_seconds=30)  # requeued: not its job any more
    second = jobs.claim_next(worker="alive", lease_seconds=30)
    assert second is not None and second.attempts == 2
    with pytest.raises(LeaseLostError):
        jobs.renew(first.id, attempt=1, lease_seconds=30)
    with pytest.raises(LeaseLostError):
        jobs.fail(first.id, "late", attempt=1)
    assert not jobs.requeue(first.id, attempt=1)
    assert jobs.renew(first.id, attempt=2, lease_seconds=30).state is JobState.RUNNING
    assert jobs.requeue(first.id, attempt=2)
    assert jobs.get(first.id).state is JobState.QUEUED


def test_requeue_expired_leaves_live_leases_and_fails_after_max_attempts(jobs: Jobs) -> None:
    live, doomed = queued(jobs, "a"), queued(jobs, "b")
    assert jobs.claim_next(worker="w", lease_seconds=60) is not None
    assert jobs.requeue_expired() == []
    jobs.requeue(live.id, attempt=1)
    jobs.cancel(live.id)
    for attempt in (1, 2):
        run = jobs.claim_next(worker="w", lease_seconds=0.01)
        assert run is not None and run.id == doomed.id and run.attempts == attempt
        time.sleep(0.05)
        [info] = jobs.requeue_expired(max_attempts=2)
    assert info.state is JobState.FAILED
    assert info.error is not None and "2 times" in info.error
    assert jobs.get(doomed.id).finished_at is not None


def test_a_version_and_its_jobs_success_commit_together(
    jobs: Jobs, db: Database, tmp_path: Path
) -> None:
    objects = LocalObjectStore(tmp_path / "objects")
    registry = Registry(db, objects)
    job = queued(jobs)
    run = jobs.claim_next(worker="w", lease_seconds=30)
    assert run is not None
    attempt = run.attempts

    def succeed(session: Session, version: VersionInfo) -> None:
        jobs.succeed_in(session, job.id, version.id, attempt=attempt)

    jobs.cancel(job.id)
    with pytest.raises(JobStateError):
        registry.publish({"state.safetensors": b"x"}, parent_id=None, finalize=succeed)
    assert registry.list() == []
    assert list(objects.list()) == []  # its blobs were removed

    other = queued(jobs, "dog")
    run = jobs.claim_next(worker="w", lease_seconds=30)
    assert run is not None and run.id == other.id

    def succeed_other(session: Session, version: VersionInfo) -> None:
        jobs.succeed_in(session, other.id, version.id, attempt=1)

    version = registry.publish(
        {"state.safetensors": b"y"}, parent_id=None, new_classes=["dog"], finalize=succeed_other
    )
    done = jobs.get(other.id)
    assert done.state is JobState.SUCCEEDED and done.version_id == version.id
    assert done.progress.percent == 100 and done.lease_expires_at is None


def test_pending_and_leftover_uploads(jobs: Jobs) -> None:
    assert not jobs.has_pending()
    a = jobs.submit(class_names=["a"], image_counts=[1], uploads_location="tasks/a/").job
    b = jobs.submit(class_names=["b"], image_counts=[1], uploads_location="tasks/b/").job
    assert jobs.has_pending()
    assert jobs.finished_tasks_with_uploads() == []
    jobs.cancel(a.id)
    assert jobs.finished_tasks_with_uploads() == [a.task_id]
    jobs.fail(b.id, "bad")
    assert jobs.finished_tasks_with_uploads() == [a.task_id, b.task_id]
    assert not jobs.has_pending()


def test_a_run_again_starts_from_no_progress(jobs: Jobs) -> None:
    """A re-run job does not show the dead run's progress until the new run reports."""
    queued(jobs)
    dead = jobs.claim_next(worker="dead", lease_seconds=0.01)
    assert dead is not None
    jobs.renew(dead.id, attempt=1, lease_seconds=0.01, stage="stage1", step=3, total=4)
    assert jobs.get(dead.id).progress.percent == 75.0
    time.sleep(0.05)
    jobs.requeue_expired()
    again = jobs.claim_next(worker="alive", lease_seconds=30)
    assert again is not None and again.attempts == 2
    assert again.progress == Progress()
    assert jobs.get(dead.id).progress == Progress()
    # The new run's reports count from zero again, not from the dead run's 75 %.
    jobs.renew(again.id, attempt=2, lease_seconds=30, stage="load", step=1, total=10)
    assert jobs.get(again.id).progress.percent == 10.0
