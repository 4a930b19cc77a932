"""The embedded dispatcher (a thread of the server process) on SQLite: order, cancel,
failures, activation, stopping and recovery, with the same job states as Celery."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from dmc_core.state import load_state
from store.errors import ClassNotFoundError, VersionNotFoundError
from store.jobs import Submission
from store.models import JobState, TaskKind
from store.service import Store
from tests.core.toy import COLOUR_NAMES
from tests.worker.helpers import (
    LONG,
    assert_grows,
    make_settings,
    submit_task,
    wait_finished,
    wait_for,
    wait_running,
)
from worker.dispatchers import make_dispatcher
from worker.embedded import EmbeddedDispatcher
from worker.settings import WorkerSettings


@pytest.fixture
def settings(tmp_path: Path, checkpoint: Path, sqlite_template: Path) -> WorkerSettings:
    database = tmp_path / "dmc.sqlite"
    shutil.copyfile(sqlite_template, database)
    return make_settings(
        database_url=f"sqlite:///{database}",
        objects_dir=tmp_path / "objects",
        checkpoint=checkpoint,
    )


@pytest.fixture
def store(settings: WorkerSettings) -> Iterator[Store]:
    store = Store.open(settings)
    yield store
    store.close()


@pytest.fixture
def dispatcher(settings: WorkerSettings, store: Store) -> Iterator[EmbeddedDispatcher]:
    dispatcher = make_dispatcher(settings, store)
    assert isinstance(dispatcher, EmbeddedDispatcher)
    dispatcher.start()
    yield dispatcher
    dispatcher.close()


def uploads_left(store: Store) -> list[str]:
    return [info.key for info in store.objects.list("tasks/")]


def wait_uploads_released(store: Store) -> None:
    """A runner releases a task's uploads right after its job finished."""
    wait_for(lambda: not uploads_left(store), timeout=10, message="the uploads to go")


def test_tasks_apply_in_order_each_on_the_previous_version(
    store: Store, dispatcher: EmbeddedDispatcher, settings: WorkerSettings
) -> None:
    first = submit_task(store, [0, 1])
    second = submit_task(store, [2, 3], seed=1)
    dispatcher.submit(first.job.id)
    dispatcher.submit(second.job.id)
    progress: dict[int, list[float]] = {}
    a, b = wait_finished(store, [first.job.id, second.job.id], progress=progress)

    assert (a.state, b.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED), (a.error, b.error)
    assert a.version_id is not None and b.version_id is not None
    v1, v2 = store.registry.get(a.version_id), store.registry.get(b.version_id)
    assert v1.parent_id is None and v2.parent_id == v1.id
    assert v1.new_classes == ("red", "green") and v2.new_classes == ("blue", "yellow")
    assert store.registry.class_names(v2.id) == COLOUR_NAMES[:4]
    assert store.registry.active() == v2
    assert (a.attempts, b.attempts) == (1, 1)
    assert a.finished_at is not None and b.started_at is not None
    assert a.finished_at <= b.started_at

    metrics = v2.metrics
    assert metrics["task_id"] == second.task.id and metrics["job_id"] == b.id
    assert metrics["images_per_class"] == {"blue": 6, "yellow": 6}
    assert (metrics["device"], metrics["precision"]) == ("cpu", "fp32")  # as actually run
    assert 0.0 <= metrics["train_accuracy"] <= 1.0
    assert metrics["calibration"]["classes"] == [0, 1]  # the old classes were calibrated
    assert metrics["duration_seconds"] > 0 and metrics["seconds"]["learn"] > 0
    assert v1.metrics["calibration"] is None  # nothing to calibrate in the first task

    for job in (a, b):
        assert_grows(progress[job.id])
        assert job.progress.percent == 100
    # The uploads are gone once learned; the state holds every class.
    wait_uploads_released(store)
    assert store.jobs.tasks.get(first.task.id).uploads_location is None
    folder = store.registry.load_state(v2.id)
    learner = load_state(folder, cache_dir=settings.model_cache_dir)
    assert learner.class_names == COLOUR_NAMES[:4]
    shutil.rmtree(folder)


def test_cancel_a_queued_and_a_running_job(store: Store, dispatcher: EmbeddedDispatcher) -> None:
    running = submit_task(store, [0, 1], LONG)
    waiting = submit_task(store, [2, 3])
    dispatcher.submit(running.job.id)
    dispatcher.submit(waiting.job.id)
    wait_running(store, running.job.id)

    assert dispatcher.cancel(waiting.job.id).state is JobState.CANCELLED
    assert dispatcher.cancel(running.job.id).state is JobState.CANCELLED

    later = submit_task(store, [4, 5], seed=2)
    dispatcher.submit(later.job.id)
    x, y, z = wait_finished(store, [running.job.id, waiting.job.id, later.job.id])
    assert (x.state, y.state, z.state) == (
        JobState.CANCELLED,
        JobState.CANCELLED,
        JobState.SUCCEEDED,
    )
    assert x.version_id is None and y.version_id is None
    [version] = store.registry.list()
    assert version.id == z.version_id and version.parent_id is None
    assert version.new_classes == ("magenta", "cyan")
    assert y.attempts == 0  # never started
    wait_uploads_released(store)


def test_failed_jobs_say_what_to_fix_and_later_jobs_still_run(
    store: Store, dispatcher: EmbeddedDispatcher
) -> None:
    undecodable = submit_task(store, [0, 1], broken=2)
    too_few = submit_task(store, [2, 3], per_class=1)
    good = submit_task(store, [0, 1])
    repeated = submit_task(store, [0, 4])  # red again
    ids = [s.job.id for s in (undecodable, too_few, good, repeated)]
    for job_id in ids:
        dispatcher.submit(job_id)
    bad_images, bad_counts, ok, bad_class = wait_finished(store, ids)

    assert bad_images.state is JobState.FAILED
    assert bad_images.error is not None
    assert "2 of the 14 uploaded images cannot be decoded" in bad_images.error
    assert "'broken-0.jpg' (class 'red')" in bad_images.error
    assert "Upload the task again" in bad_images.error
    assert bad_counts.state is JobState.FAILED
    assert bad_counts.error is not None and "at least 2 are needed" in bad_counts.error
    assert ok.state is JobState.SUCCEEDED
    assert bad_class.state is JobState.FAILED
    assert bad_class.error is not None and "classes already learned: ['red']" in bad_class.error
    assert [v.id for v in store.registry.list()] == [ok.version_id]
    wait_uploads_released(store)


def test_a_task_can_ask_not_to_be_activated(store: Store, dispatcher: EmbeddedDispatcher) -> None:
    first = submit_task(store, [0, 1])
    second = submit_task(store, [2, 3], activate=False)
    dispatcher.submit(first.job.id)
    dispatcher.submit(second.job.id)
    a, b = wait_finished(store, [first.job.id, second.job.id])
    assert b.state is JobState.SUCCEEDED and b.version_id is not None
    active = store.registry.active()
    assert active is not None and active.id == a.version_id
    newest = store.registry.newest()
    assert newest is not None and newest.id == b.version_id and newest.parent_id == a.version_id


def test_closing_hands_the_running_job_back_and_the_next_start_finishes_it(
    store: Store, settings: WorkerSettings
) -> None:
    job = submit_task(store, [0, 1], LONG).job
    with EmbeddedDispatcher(settings, store) as first:
        first.submit(job.id)
        wait_running(store, job.id)
    handed_back = store.jobs.get(job.id)
    assert handed_back.state is JobState.QUEUED and handed_back.attempts == 1
    assert store.registry.list() == []

    with EmbeddedDispatcher(settings, store):  # starts by running what is queued
        [done] = wait_finished(store, [job.id])
    assert done.state is JobState.SUCCEEDED and done.attempts == 2
    assert [v.id for v in store.registry.list()] == [done.version_id]


def test_a_dead_runners_job_runs_again_once_its_lease_expires(
    store: Store, settings: WorkerSettings
) -> None:
    job = submit_task(store, [0, 1]).job
    dead = store.jobs.claim_next(worker="dead:1", lease_seconds=1.5)
    assert dead is not None and dead.lease_expires_at is not None
    with EmbeddedDispatcher(settings, store):
        [done] = wait_finished(store, [job.id])
    assert done.state is JobState.SUCCEEDED and done.attempts == 2
    assert done.started_at is not None and done.started_at >= dead.lease_expires_at
    assert done.worker != "dead:1"
    assert len(store.registry.list()) == 1


def test_a_job_whose_runner_keeps_dying_fails(store: Store, settings: WorkerSettings) -> None:
    job = submit_task(store, [0, 1]).job
    for _ in range(2):
        store.jobs.claim_next(worker="dead:1", lease_seconds=0.01)
        time.sleep(0.05)
        store.jobs.requeue_expired()
    store.jobs.claim_next(worker="dead:1", lease_seconds=0.01)
    time.sleep(0.05)
    assert settings.job_max_attempts == 3
    with EmbeddedDispatcher(settings, store):
        [done] = wait_finished(store, [job.id])
    assert done.state is JobState.FAILED and done.attempts == 3
    assert done.error is not None and "stopped 3 times" in done.error
    assert store.registry.list() == []
    wait_uploads_released(store)


def test_a_job_that_was_never_announced_is_found_by_the_sweep(
    store: Store, settings: WorkerSettings
) -> None:
    sweeping = settings.model_copy(update={"job_sweep_seconds": 0.2})
    with EmbeddedDispatcher(sweeping, store) as dispatcher:
        time.sleep(0.3)  # the start-up pass found nothing
        job = submit_task(store, [0, 1]).job  # and nobody calls dispatcher.submit
        [done] = wait_finished(store, [job.id])
        assert dispatcher.running
    assert done.state is JobState.SUCCEEDED
    assert done.finished_at is not None and done.finished_at <= datetime.now(UTC)


# --- class lifecycle: updates build on the active version; extend, remove, rename ---------


def _run(store: Store, dispatcher: EmbeddedDispatcher, *submissions: Submission) -> list[int]:
    ids = [s.job.id for s in submissions]
    for job_id in ids:
        dispatcher.submit(job_id)
    jobs = wait_finished(store, ids)
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [j.error for j in jobs]
    return [j.version_id for j in jobs if j.version_id is not None]


def test_after_a_rollback_the_next_update_builds_on_the_active_version(
    store: Store, dispatcher: EmbeddedDispatcher
) -> None:
    [v1] = _run(store, dispatcher, submit_task(store, [0, 1]))
    [v2] = _run(store, dispatcher, submit_task(store, [2, 3], seed=1))
    store.registry.activate(v1)  # roll back: blue and yellow live only on v2's branch
    # Names are unique within the lineage: blue may be learned again on v1's.
    [v3] = _run(store, dispatcher, submit_task(store, [2], seed=2))
    assert store.registry.get(v3).parent_id == v1
    assert store.registry.class_names(v3) == ["red", "green", "blue"]
    # An explicit base version: built on v2 although v3 is active.
    [v4] = _run(store, dispatcher, submit_task(store, [4], seed=3, base_version_id=v2))
    assert store.registry.get(v4).parent_id == v2
    assert store.registry.class_names(v4) == [*COLOUR_NAMES[:4], "magenta"]


def test_extend_remove_and_rename_each_make_a_version(
    store: Store, dispatcher: EmbeddedDispatcher, settings: WorkerSettings
) -> None:
    [v1] = _run(store, dispatcher, submit_task(store, [0, 1]))
    extend = submit_task(store, [1], seed=4, kind=TaskKind.EXTEND)
    [v2] = _run(store, dispatcher, extend)
    remove = store.jobs.submit(
        class_names=["red"], image_counts=[], kind=TaskKind.REMOVE, refuse_taken_classes=True
    )
    [v3] = _run(store, dispatcher, remove)
    rename = store.jobs.submit(
        class_names=["green"],
        image_counts=[],
        kind=TaskKind.RENAME,
        arguments={"name": "lime"},
        refuse_taken_classes=True,
    )
    [v4] = _run(store, dispatcher, rename)
    readd = submit_task(store, [0], seed=5)  # red again, after its removal
    [v5] = _run(store, dispatcher, readd)

    versions = {v: store.registry.get(v) for v in (v2, v3, v4, v5)}
    assert [versions[v].parent_id for v in (v2, v3, v4, v5)] == [v1, v2, v3, v4]
    assert versions[v2].change["kind"] == "extend"
    assert versions[v2].metrics["images_per_class"] == {"green": 6}
    assert versions[v2].metrics["task_kind"] == "extend"
    assert store.registry.class_names(v3) == ["green"]
    assert store.registry.class_names(v4) == ["lime"]
    assert store.registry.class_names(v5) == ["lime", "red"]
    assert store.registry.active() == versions[v5]

    folder = store.registry.load_state(v5)
    learner = load_state(folder, cache_dir=settings.model_cache_dir)
    shutil.rmtree(folder)
    assert learner.class_names == ["lime", "red"]
    assert learner.memory.count(0) == 12  # green's 6 images, then 6 more


def test_class_changes_are_checked_against_the_version_they_build_on(store: Store) -> None:
    with pytest.raises(ClassNotFoundError):
        store.jobs.submit(
            class_names=["red"], image_counts=[], kind=TaskKind.REMOVE, refuse_taken_classes=True
        )
    with pytest.raises(ValueError, match="no images"):
        store.jobs.submit(class_names=["red"], image_counts=[3], kind=TaskKind.REMOVE)
    with pytest.raises(VersionNotFoundError):
        store.jobs.submit(
            class_names=["red"], image_counts=[3], base_version_id=99, refuse_taken_classes=True
        )
