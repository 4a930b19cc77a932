"""Celery over a real Redis, real `dmc worker` processes and a real PostgreSQL."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from store.models import JobState, TaskKind
from store.service import Store
from tests.core.toy import COLOUR_NAMES
from tests.worker.conftest import WorkerProcess
from tests.worker.helpers import (
    LONG,
    assert_grows,
    submit_task,
    wait_finished,
    wait_for,
    wait_running,
)
from worker.celery_app import CeleryDispatcher
from worker.dispatchers import make_dispatcher
from worker.settings import WorkerSettings

pytestmark = pytest.mark.slow

StartWorker = Callable[..., WorkerProcess]


@pytest.fixture
def dispatcher(pg_settings: WorkerSettings, pg_store: Store) -> CeleryDispatcher:
    dispatcher = make_dispatcher(pg_settings, pg_store)
    assert isinstance(dispatcher, CeleryDispatcher)
    return dispatcher


def logs(*workers: WorkerProcess) -> Callable[[], str]:
    return lambda: "\n".join(f"--- {w.name}\n{w.log()[-3000:]}" for w in workers)


def test_two_tasks_back_to_back_apply_in_order_with_two_workers(
    pg_store: Store, dispatcher: CeleryDispatcher, start_worker: StartWorker
) -> None:
    workers = [start_worker("a"), start_worker("b")]
    for worker in workers:
        worker.wait_ready()
    first = submit_task(pg_store, [0, 1])
    dispatcher.submit(first.job.id)
    second = submit_task(pg_store, [2, 3], seed=1)
    dispatcher.submit(second.job.id)

    progress: dict[int, list[float]] = {}
    a, b = wait_finished(
        pg_store, [first.job.id, second.job.id], progress=progress, message=logs(*workers)
    )
    assert (a.state, b.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED), (a.error, b.error)
    assert a.version_id is not None and b.version_id is not None
    v1, v2 = pg_store.registry.get(a.version_id), pg_store.registry.get(b.version_id)
    assert v1.parent_id is None and v2.parent_id == v1.id
    assert pg_store.registry.class_names(v2.id) == COLOUR_NAMES[:4]
    assert pg_store.registry.active() == v2
    assert a.finished_at is not None and b.started_at is not None
    assert a.finished_at <= b.started_at
    assert v2.metrics["images_per_class"] == {"blue": 6, "yellow": 6}
    assert v2.metrics["calibration"] is not None
    for job in (a, b):
        assert_grows(progress[job.id])
    for worker in workers:
        assert worker.stop() == 0, worker.log()[-3000:]


def test_a_worker_killed_mid_job_is_replaced_and_the_job_completes_exactly_once(
    pg_store: Store, dispatcher: CeleryDispatcher, start_worker: StartWorker
) -> None:
    doomed = start_worker("doomed")
    first = submit_task(pg_store, [0, 1])
    dispatcher.submit(first.job.id)
    [done] = wait_finished(pg_store, [first.job.id], message=logs(doomed))
    assert done.state is JobState.SUCCEEDED and done.version_id is not None
    old = done.version_id

    long = submit_task(pg_store, [2, 3], LONG, seed=1)
    dispatcher.submit(long.job.id)
    before = wait_running(pg_store, long.job.id)
    doomed.kill()
    after = pg_store.jobs.get(long.job.id)
    assert after.state is JobState.RUNNING and after.attempts == 1
    assert before.progress.percent <= after.progress.percent < 100

    progress: dict[int, list[float]] = {}

    def active_stays_old() -> None:
        # Read `active` before the job: if the job had not succeeded by the second read,
        # it had not by the first either, so `active` must still be the old version.
        active = pg_store.registry.active()
        assert active is not None
        if active.id != old:
            assert pg_store.jobs.get(long.job.id).state is JobState.SUCCEEDED
        assert len(pg_store.registry.list()) <= 2

    replacement = start_worker("replacement")
    [job] = wait_finished(
        pg_store,
        [long.job.id],
        watch=active_stays_old,
        progress=progress,
        message=logs(doomed, replacement),
    )
    assert job.state is JobState.SUCCEEDED, job.error
    assert job.attempts == 2
    versions = pg_store.registry.list()
    assert [v.id for v in versions] == [job.version_id, old]
    assert versions[0].parent_id == old
    assert pg_store.registry.active() == versions[0]
    assert pg_store.registry.class_names(versions[0].id) == COLOUR_NAMES[:4]
    # The dead run's progress stands until the job is claimed again; the new run's counts
    # from zero (`claim_next` resets it) and only grows.
    series = [after.progress.percent, *progress[long.job.id]]
    reset = next((i for i in range(1, len(series)) if series[i] < series[i - 1]), len(series))
    assert set(series[:reset]) == {after.progress.percent}, series
    assert_grows(series[reset:])
    # Nothing half-written: every blob belongs to a version.
    stored = {info.key for info in pg_store.objects.list("blobs/")}
    assert stored == {key for v in versions for key in v.keys.values()}
    assert "queued again" in replacement.log()


def test_cancel_a_queued_and_a_running_job_then_fail_one_and_run_the_next(
    pg_store: Store, dispatcher: CeleryDispatcher, start_worker: StartWorker
) -> None:
    worker = start_worker("w")
    running = submit_task(pg_store, [0, 1], LONG)
    waiting = submit_task(pg_store, [2, 3])
    for submission in (running, waiting):
        dispatcher.submit(submission.job.id)
    wait_running(pg_store, running.job.id)

    assert dispatcher.cancel(waiting.job.id).state is JobState.CANCELLED
    assert dispatcher.cancel(running.job.id).state is JobState.CANCELLED

    broken = submit_task(pg_store, [4, 5], broken=1)
    good = submit_task(pg_store, [4, 5], seed=3)
    for submission in (broken, good):
        dispatcher.submit(submission.job.id)
    ids = [s.job.id for s in (running, waiting, broken, good)]
    x, y, f, g = wait_finished(pg_store, ids, message=logs(worker))
    assert (x.state, y.state) == (JobState.CANCELLED, JobState.CANCELLED)
    assert x.version_id is None and y.version_id is None and y.attempts == 0
    assert f.state is JobState.FAILED
    assert f.error is not None and "'broken-0.jpg' (class 'magenta')" in f.error
    assert "cannot be decoded" in f.error
    assert g.state is JobState.SUCCEEDED, g.error
    [version] = pg_store.registry.list()
    assert version.id == g.version_id and version.parent_id is None
    assert pg_store.registry.active() == version
    wait_for(lambda: not list(pg_store.objects.list("tasks/")), timeout=10, message="uploads to go")
    assert worker.stop() == 0


def test_a_warm_shutdown_hands_the_running_job_back(
    pg_store: Store, dispatcher: CeleryDispatcher, start_worker: StartWorker
) -> None:
    worker = start_worker("w")
    job = submit_task(pg_store, [0, 1], LONG).job
    dispatcher.submit(job.id)
    wait_running(pg_store, job.id)
    assert worker.stop(timeout=20) == 0, worker.log()[-3000:]
    info = pg_store.jobs.get(job.id)
    assert info.state is JobState.QUEUED and info.attempts == 1
    assert info.lease_expires_at is None
    assert pg_store.registry.list() == []
    assert "the worker is stopping; queued again" in worker.log()


def test_a_worker_collects_old_orphans_on_its_schedule(
    pg_store: Store, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Deployed mode: the worker's sweeper collects an old orphan upload and a killed
    run's scratch folder, and spares young ones."""
    grace = 600.0
    old = time.time() - 2 * grace
    objects = Path(pg_store.settings.objects_dir)
    keys = {age: f"tasks/{age * 32}/images/000000" for age in ("o", "y")}
    for age, key in keys.items():
        pg_store.objects.put_bytes(key, b"image")
        if age == "o":
            os.utime(objects / key, (old, old))
    work = tmp_path / "work"
    folders = {age: work / f"dmc-job-{index}-{age}" for index, age in enumerate("oy")}
    for age, folder in folders.items():
        folder.mkdir(parents=True)
        if age == "o":
            os.utime(folder, (old, old))
    worker = start_worker(
        "gc",
        DMC_WORK_DIR=str(work),
        DMC_GC_INTERVAL_SECONDS="0.5",
        DMC_GC_GRACE_SECONDS=str(grace),
        DMC_JOB_SWEEP_SECONDS="0.2",
    )
    worker.wait_ready()

    def counted() -> bool:
        totals = {row.kind: row.total for row in pg_store.garbage.totals()}
        return totals == {"objects": 1, "scratch_folders": 1}

    wait_for(counted, timeout=60, message=logs(worker))
    assert not pg_store.objects.exists(keys["o"]) and not folders["o"].exists()
    assert pg_store.objects.exists(keys["y"]) and folders["y"].is_dir()


def test_extend_remove_and_rename_survive_a_killed_worker_exactly_once(
    pg_store: Store, dispatcher: CeleryDispatcher, start_worker: StartWorker
) -> None:
    doomed = start_worker("doomed")
    first = submit_task(pg_store, [0, 1])
    dispatcher.submit(first.job.id)
    [done] = wait_finished(pg_store, [first.job.id], message=logs(doomed))
    assert done.state is JobState.SUCCEEDED and done.version_id is not None

    extend = submit_task(pg_store, [1], LONG, seed=1, kind=TaskKind.EXTEND)
    remove = pg_store.jobs.submit(class_names=["red"], image_counts=[], kind=TaskKind.REMOVE)
    rename = pg_store.jobs.submit(
        class_names=["green"], image_counts=[], kind=TaskKind.RENAME, arguments={"name": "lime"}
    )
    ids = [extend.job.id, remove.job.id, rename.job.id]
    for job_id in ids:
        dispatcher.submit(job_id)
    wait_running(pg_store, extend.job.id)
    doomed.kill()

    replacement = start_worker("replacement")
    jobs = wait_finished(pg_store, ids, message=logs(doomed, replacement))
    assert all(j.state is JobState.SUCCEEDED for j in jobs), [j.error for j in jobs]
    assert jobs[0].attempts == 2
    # One version per job, each on the previous one: nothing applied twice or lost.
    versions = pg_store.registry.list()
    assert [v.id for v in versions] == [j.version_id for j in reversed(jobs)] + [done.version_id]
    assert [v.parent_id for v in versions[:3]] == [v.id for v in versions[1:]]
    assert pg_store.registry.class_names(versions[0].id) == ["lime"]
    assert [v.change["kind"] for v in versions[:3]] == ["rename", "remove", "extend"]
    assert versions[2].metrics["images_per_class"] == {"green": LONG}
