"""Tasks and jobs: idempotent submission, state transitions, progress."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from store.db import Database
from store.errors import (
    ClassesTakenError,
    IdempotencyConflictError,
    JobNotFoundError,
    JobStateError,
    TaskNotFoundError,
    VersionNotFoundError,
)
from store.jobs import Jobs, Submission
from store.models import JobState
from store.objects import LocalObjectStore
from store.registry import Registry


@pytest.fixture
def jobs(db: Database) -> Jobs:
    return Jobs(db)


def submit(
    jobs: Jobs, key: str | None = None, names: tuple[str, ...] = ("cat", "dog")
) -> Submission:
    return jobs.submit(
        class_names=names,
        image_counts=[3] * len(names),
        uploads_location="tasks/abc/",
        idempotency_key=key,
    )


def test_submit_creates_a_task_and_a_queued_job(jobs: Jobs) -> None:
    sub = submit(jobs)
    assert sub.created
    assert sub.task.class_names == ("cat", "dog")
    assert sub.task.image_counts == (3, 3)
    assert sub.task.uploads_location == "tasks/abc/"
    assert sub.job.task_id == sub.task.id
    assert sub.job.state is JobState.QUEUED
    assert sub.job.attempts == 0
    assert sub.job.progress.percent == 0
    assert jobs.get(sub.job.id) == sub.job
    assert jobs.tasks.get(sub.task.id) == sub.task


def test_idempotency_key_replays_the_earlier_task(jobs: Jobs) -> None:
    first = submit(jobs, key="upload-1")
    again = submit(jobs, key="upload-1")
    assert not again.created
    assert (again.task, again.job) == (first.task, first.job)
    with pytest.raises(IdempotencyConflictError, match="upload-1"):
        submit(jobs, key="upload-1", names=("owl",))
    assert len(jobs.list()) == 1
    assert submit(jobs, key="upload-2").created
    assert submit(jobs).created and submit(jobs).created  # no key: always new


def test_idempotency_key_with_other_images_conflicts(jobs: Jobs) -> None:
    def send(digest: str | None) -> Submission:
        return jobs.submit(
            class_names=["cat"], image_counts=[3], idempotency_key="k", payload_digest=digest
        )

    first = send("a" * 64)
    assert first.task.payload_digest == "a" * 64
    assert not send("a" * 64).created
    assert not send(None).created  # a replay that records no digest is not checked
    with pytest.raises(IdempotencyConflictError, match="images"):
        send("b" * 64)
    assert len(jobs.list()) == 1


def test_concurrent_submissions_with_one_key(jobs: Jobs) -> None:
    barrier = threading.Barrier(4)
    results: list[Submission] = []

    def client() -> None:
        barrier.wait(timeout=10)
        results.append(submit(jobs, key="same"))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(results) == 4
    assert sum(r.created for r in results) == 1
    assert len({r.job.id for r in results}) == 1
    assert len(jobs.list()) == 1


def test_submit_validates(jobs: Jobs) -> None:
    with pytest.raises(ValueError, match="at least one class"):
        jobs.submit(class_names=[], image_counts=[])
    with pytest.raises(ValueError, match="image counts"):
        jobs.submit(class_names=["a"], image_counts=[1, 2])
    with pytest.raises(ValueError, match="unique"):
        jobs.submit(class_names=["a", "a"], image_counts=[1, 1])
    with pytest.raises(ValueError, match="at least one image"):
        jobs.submit(class_names=["a"], image_counts=[0])
    assert jobs.list() == []


def test_job_lifecycle_and_progress(jobs: Jobs, db: Database, tmp_path: Path) -> None:
    registry = Registry(db, LocalObjectStore(tmp_path / "objects"))
    job = submit(jobs).job
    with pytest.raises(JobStateError, match="queued"):
        jobs.report_progress(job.id, stage="train", step=1, total=10)

    running = jobs.start(job.id)
    assert running.state is JobState.RUNNING
    assert running.attempts == 1
    assert running.started_at is not None

    p = jobs.report_progress(job.id, stage="embed", step=5, total=10).progress
    assert (p.stage, p.step, p.total, p.percent) == ("embed", 5, 10, 50.0)
    # Progress never goes back, even when a new stage restarts its own count.
    p = jobs.report_progress(job.id, stage="train", step=1, total=10).progress
    assert (p.stage, p.step, p.percent) == ("train", 1, 50.0)
    assert jobs.report_progress(job.id, stage="train", step=8, total=10).progress.percent == 80
    assert (
        jobs.report_progress(job.id, stage="t", step=0, total=0, percent=150).progress.percent
        == 100
    )

    with pytest.raises(VersionNotFoundError):
        jobs.succeed(job.id, 4242)
    version = registry.publish({"state.safetensors": b"x"}, parent_id=None)
    done = jobs.succeed(job.id, version.id)
    assert done.state is JobState.SUCCEEDED
    assert done.version_id == version.id
    assert done.finished_at is not None
    assert done.progress.percent == 100
    for action in (jobs.start, jobs.cancel):
        with pytest.raises(JobStateError, match="succeeded"):
            action(job.id)
    with pytest.raises(JobStateError):
        jobs.fail(job.id, "late")
    assert jobs.get(job.id) == done


def test_redelivered_job_counts_attempts(jobs: Jobs) -> None:
    job = submit(jobs).job
    jobs.start(job.id)
    again = jobs.start(job.id)
    assert again.attempts == 2
    failed = jobs.fail(job.id, "CUDA out of memory")
    assert failed.state is JobState.FAILED
    assert failed.error == "CUDA out of memory"


def test_cancel(jobs: Jobs) -> None:
    queued = submit(jobs).job
    assert jobs.cancel(queued.id).state is JobState.CANCELLED
    with pytest.raises(JobStateError, match="cancelled"):
        jobs.start(queued.id)
    running = submit(jobs).job
    jobs.start(running.id)
    assert jobs.cancel(running.id).state is JobState.CANCELLED
    with pytest.raises(JobStateError):
        jobs.succeed(running.id, 1)


def test_list_filters_newest_first(jobs: Jobs) -> None:
    a, b, c = (submit(jobs).job for _ in range(3))
    jobs.start(b.id)
    assert [j.id for j in jobs.list()] == [c.id, b.id, a.id]
    assert [j.id for j in jobs.list(states=[JobState.QUEUED])] == [c.id, a.id]
    assert [j.id for j in jobs.list(task_id=b.task_id)] == [b.id]
    assert [j.id for j in jobs.list(limit=1, offset=1)] == [b.id]


def test_unknown_ids(jobs: Jobs) -> None:
    with pytest.raises(JobNotFoundError, match="job 99 does not exist"):
        jobs.get(99)
    for action in (jobs.start, jobs.cancel):
        with pytest.raises(JobNotFoundError):
            action(99)
    with pytest.raises(TaskNotFoundError):
        jobs.tasks.get(99)


def test_a_taken_class_is_refused_but_a_replay_is_not(jobs: Jobs) -> None:
    first = jobs.submit(class_names=["cat"], image_counts=[2], idempotency_key="k")
    again = jobs.submit(
        class_names=["cat"], image_counts=[2], idempotency_key="k", refuse_taken_classes=True
    )
    assert not again.created and again.job == first.job
    assert jobs.precheck("k", ["cat"], [2], None) == again
    for check in (
        lambda: jobs.submit(class_names=["cat"], image_counts=[2], refuse_taken_classes=True),
        lambda: jobs.precheck("other", ["cat", "owl"], [2, 2], None),
    ):
        with pytest.raises(ClassesTakenError, match=f"queued in task {first.task.id}"):
            check()
    assert jobs.precheck(None, ["owl"], [2], None) is None
    assert len(jobs.list()) == 1


def test_concurrent_submissions_with_one_key_from_separate_engines(database_url: str) -> None:
    """Like several API replicas: each client has its own engine (connection pool)."""
    clients = 6
    barrier = threading.Barrier(clients)
    results: list[Submission | BaseException] = []

    def client() -> None:
        db = Database.from_url(database_url)
        try:
            barrier.wait(timeout=10)
            results.append(
                Jobs(db).submit(
                    class_names=["cat"],
                    image_counts=[2],
                    idempotency_key="same",
                    refuse_taken_classes=True,
                )
            )
        except BaseException as error:
            results.append(error)
        finally:
            db.dispose()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(isinstance(r, Submission) for r in results), results
    submissions = [r for r in results if isinstance(r, Submission)]
    assert len(submissions) == clients
    assert sum(s.created for s in submissions) == 1
    assert len({s.job.id for s in submissions}) == 1
