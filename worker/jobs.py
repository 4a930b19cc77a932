"""The job that turns a task into a version, and the loop that runs the queued jobs.

Both dispatchers (Celery, embedded thread) call `JobRunner.learn_task(job_id)` when a job
is announced. The message is only a wake-up: the runner takes the update lock (one
runner at a time across all workers; see `worker.locking`), then claims and runs the
oldest queued job, again and again until none is left, so updates apply one at a time in
submission order, each on the newest version.

One run of a job (`attempts` is its fencing token):
1. load the task's images and decode them; load the newest version's state (or build the
   base learner when there is none);
2. `Learner.learn_task`, writing progress (stage, step, total, overall percent) to the job
   at most every `job_progress_interval_seconds`; each write also renews the lease and
   sees a cancel; a heartbeat thread renews the lease in between;
3. save the state, publish it with `require_newest_parent=True` and, in the same
   transaction, mark the job succeeded (refused if the job was cancelled or another run
   took it over): the version and the job's success commit together or not at all;
4. release the task's uploads.

Recovery: a run that dies (SIGKILL, OOM, power) leaves its job `running` and its update
lock released by the database or the kernel. The next holder of the lock re-queues any
running job whose lease has expired (failing it after `job_max_attempts` runs) and runs it
again before the jobs queued after it; `active` keeps pointing at the old version all the
while, and nothing of the dead run is visible (blobs of an unfinished publish are the
store's garbage collector's).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import torch
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from dmc_core.backbone import BackboneError
from dmc_core.learner import Learner, TaskError
from dmc_core.state import StateError, save_state
from store.errors import (
    DuplicateClassError,
    JobStateError,
    LeaseLostError,
    StaleParentError,
    StoreError,
)
from store.jobs import JobInfo, Jobs
from store.models import JobState
from store.registry import VersionInfo
from store.service import Store
from worker.errors import JobCancelledError, JobFailedError, WorkerStoppingError
from worker.images import decode_task_images
from worker.locking import LockLostError, UpdateLock, make_update_lock
from worker.model import build_base_learner, load_learner
from worker.progress import (
    LEARN_START,
    LOAD_PERCENT,
    PUBLISH_PERCENT,
    SAVE_PERCENT,
    ProgressTracker,
    learning_stages,
)
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors of the database connection itself: the job is left as it is (running) and run
# again once its lease expires.
_CONNECTION_ERRORS = (OperationalError, InterfaceError)
# How often a job is learned again when another version appeared meanwhile.
_PUBLISH_TRIES = 3


@dataclass(frozen=True)
class JobOutcome:
    """How one run of a job ended, as its runner saw it."""

    job_id: int
    attempt: int
    # SUCCEEDED, FAILED, CANCELLED, QUEUED (handed back: the worker is stopping), or None:
    # the run lost the job (its lock or lease) and left it to whoever holds it now.
    state: JobState | None
    version_id: int | None = None
    error: str | None = None


def default_worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class JobRunner:
    """Runs the queued jobs of one store, one at a time, in order (see the module doc)."""

    def __init__(
        self,
        store: Store,
        settings: WorkerSettings,
        *,
        name: str | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.name = name or default_worker_name()
        # Set it to stop: the running job is handed back to the queue at its next progress.
        self.stop = stop or threading.Event()
        self._busy = threading.Lock()

    @property
    def busy(self) -> bool:
        """Whether this runner is inside `run_pending` now."""
        return self._busy.locked()

    def learn_task(self, job_id: int | None = None) -> list[JobOutcome]:
        """What a dispatcher calls when job `job_id` is announced (None: a sweep): run the
        queued jobs in submission order, that one among them. Returns the runs made here;
        none when another runner holds the update lock (it will get to the job)."""
        if job_id is not None:
            log.debug("job %d announced", job_id)
        return self.run_pending()

    def run_pending(self) -> list[JobOutcome]:
        outcomes: list[JobOutcome] = []
        if not self._busy.acquire(blocking=False):
            return outcomes  # this runner is already at it, in another thread
        try:
            while not self.stop.is_set():
                lock = make_update_lock(self.store.db)
                try:
                    if not lock.acquire():
                        # Its holder looks for queued jobs again after releasing it.
                        return outcomes
                except _CONNECTION_ERRORS as error:
                    log.warning("cannot reach the database to take the update lock: %s", error)
                    return outcomes
                try:
                    self._drain(lock, outcomes)
                except (LockLostError, *_CONNECTION_ERRORS) as error:
                    log.warning("stopped running jobs: %s", error)
                    return outcomes
                finally:
                    lock.release()
                # A job submitted while the lock was being released found it taken: look
                # again now that it is free.
                try:
                    if not self.store.jobs.has_pending():
                        return outcomes
                except _CONNECTION_ERRORS:
                    return outcomes
            return outcomes
        finally:
            self._busy.release()

    # --- the queue -------------------------------------------------------------------

    def _drain(self, lock: UpdateLock, outcomes: list[JobOutcome]) -> None:
        jobs = self.store.jobs
        while not self.stop.is_set():
            lock.check()
            self._recover()
            running = jobs.list(states=[JobState.RUNNING], limit=None)
            if running:
                # Its runner lost the lock (a broken connection) but may be alive and
                # still renewing the lease: let it finish or let the lease run out.
                wait = _seconds_to_expiry(running, self.settings.job_lease_seconds)
                log.info(
                    "job %d is running elsewhere (%s); waiting %.1fs for it or its lease",
                    running[-1].id,
                    running[-1].worker,
                    wait,
                )
                self.stop.wait(wait)
                continue
            job = jobs.claim_next(worker=self.name, lease_seconds=self.settings.job_lease_seconds)
            if job is None:
                return
            outcomes.append(self._run(job, lock))

    def _recover(self) -> None:
        jobs = self.store.jobs
        for job in jobs.requeue_expired(max_attempts=self.settings.job_max_attempts):
            if job.state is JobState.FAILED:
                log.error("job %d failed: its runner died %d times", job.id, job.attempts)
            else:
                log.warning(
                    "job %d: its runner (%s) stopped during run %d; it is queued again",
                    job.id,
                    job.worker,
                    job.attempts,
                )
        if not self.store.uploads.keep_uploads:
            for task_id in jobs.finished_tasks_with_uploads():
                self._release_uploads(task_id)

    def _release_uploads(self, task_id: int) -> None:
        try:
            self.store.uploads.release(task_id)
        except Exception as error:
            log.warning("could not release the uploads of task %d: %s", task_id, error)

    # --- one run ---------------------------------------------------------------------

    def _run(self, job: JobInfo, lock: UpdateLock) -> JobOutcome:
        attempt = job.attempts
        jobs = self.store.jobs
        log.info("job %d (task %d): run %d starts on %s", job.id, job.task_id, attempt, self.name)
        heartbeat = _Heartbeat(jobs, lock, job.id, attempt, self.settings.job_lease_seconds)
        progress = _ProgressWriter(
            jobs,
            job.id,
            attempt,
            lease_seconds=self.settings.job_lease_seconds,
            interval=self.settings.job_progress_interval_seconds,
            heartbeat=heartbeat,
            stop=self.stop,
        )
        workdir = Path(tempfile.mkdtemp(prefix=f"dmc-job-{job.id}-", dir=self.settings.work_dir))
        heartbeat.start()
        try:
            version = self._learn(job, progress, workdir)
        except JobCancelledError:
            log.info("job %d was cancelled during run %d", job.id, attempt)
            self._release_uploads(job.task_id)
            return JobOutcome(job.id, attempt, JobState.CANCELLED)
        except WorkerStoppingError:
            handed_back = _quietly(lambda: jobs.requeue(job.id, attempt=attempt), False)
            log.info("job %d: the worker is stopping; queued again: %s", job.id, handed_back)
            return JobOutcome(job.id, attempt, JobState.QUEUED if handed_back else None)
        except (LeaseLostError, LockLostError) as error:
            # Someone else may own the job now. Hand it back if it is still ours, so the
            # new lock holder need not wait for the lease, and stop running jobs.
            _quietly(lambda: jobs.requeue(job.id, attempt=attempt), False)
            raise LockLostError(f"job {job.id} run {attempt} lost its claim: {error}") from error
        except _CONNECTION_ERRORS:
            raise  # the job stays running; it is run again when its lease expires
        except Exception as error:
            message = _failure_message(error)
            if isinstance(error, JobFailedError | TaskError):
                log.warning("job %d failed: %s", job.id, message)
            else:
                log.exception("job %d failed unexpectedly", job.id)
            return self._fail(job, attempt, message)
        finally:
            heartbeat.halt()
            shutil.rmtree(workdir, ignore_errors=True)
            _free_memory()
        log.info("job %d succeeded: version %d", job.id, version.id)
        self._release_uploads(job.task_id)
        return JobOutcome(job.id, attempt, JobState.SUCCEEDED, version_id=version.id)

    def _fail(self, job: JobInfo, attempt: int, message: str) -> JobOutcome:
        try:
            self.store.jobs.fail(job.id, message, attempt=attempt)
        except JobStateError:
            # Cancelled meanwhile: the cancel stands.
            self._release_uploads(job.task_id)
            return JobOutcome(job.id, attempt, JobState.CANCELLED)
        except LeaseLostError as error:
            raise LockLostError(str(error)) from error
        self._release_uploads(job.task_id)
        return JobOutcome(job.id, attempt, JobState.FAILED, error=message)

    def _learn(self, job: JobInfo, progress: _ProgressWriter, workdir: Path) -> VersionInfo:
        started = time.perf_counter()
        store = self.store
        progress.phase("load", LOAD_PERCENT)
        task = store.jobs.get_task(job.task_id)
        if task.uploads_location is None:
            raise JobFailedError(
                f"the images of task {task.id} are no longer stored, so it cannot be learned; "
                "upload the task again"
            )
        try:
            uploads = store.uploads.load(task.uploads_location)
        except StoreError as error:
            raise JobFailedError(
                f"the uploaded images cannot be read back from the object store ({error}); "
                "upload the task again"
            ) from error
        images, labels = decode_task_images(
            uploads, task.class_names, max_side=self.settings.max_image_side
        )
        del uploads
        seconds: dict[str, float] = {"images": time.perf_counter() - started}

        for tries in range(1, _PUBLISH_TRIES + 1):
            timer = time.perf_counter()
            parent = store.registry.newest()
            learner = self._learner_on(parent, workdir)
            seconds["load_state"] = time.perf_counter() - timer

            progress.learning(learning_stages(learner))
            timer = time.perf_counter()
            report = learner.learn_task(images, labels, task.class_names, progress=progress)
            seconds["learn"] = time.perf_counter() - timer

            progress.phase("save", SAVE_PERCENT)
            timer = time.perf_counter()
            state_dir = workdir / f"state-{tries}"
            save_state(learner, state_dir)
            seconds["save"] = time.perf_counter() - timer
            metrics = _metrics(job, task.id, learner, report.to_dict(), seconds, started)
            del learner
            _free_memory()

            progress.phase("publish", PUBLISH_PERCENT)

            def finalize(session: Session, version: VersionInfo) -> None:
                store.jobs.succeed_in(session, job.id, version.id, attempt=job.attempts)

            try:
                return store.registry.publish(
                    state_dir,
                    parent_id=parent.id if parent else None,
                    metrics=metrics,
                    new_classes=task.class_names,
                    task_id=task.id,
                    activate=task.activate,
                    require_newest_parent=True,
                    finalize=finalize,
                )
            except StaleParentError as error:
                log.warning("job %d: %s; learning it again (try %d)", job.id, error, tries + 1)
                shutil.rmtree(state_dir, ignore_errors=True)
            except JobStateError as error:
                raise JobCancelledError() from error
        raise JobFailedError(
            f"other versions were published while this task was learned, {_PUBLISH_TRIES} "
            "times in a row; upload the task again when no other update is running"
        )

    def _learner_on(self, parent: VersionInfo | None, workdir: Path) -> Learner:
        if parent is None:
            try:
                return build_base_learner(self.settings)
            except BackboneError as error:
                raise JobFailedError(
                    f"the base model cannot be loaded: {error}. Check the DMC_BACKBONE_* "
                    "settings and that the model files are available to the worker"
                ) from error
        folder = workdir / f"parent-{parent.id}"
        try:
            self.store.registry.load_state(parent.id, folder, part="full")
            learner = load_learner(folder, self.settings)
        except (StoreError, StateError, BackboneError) as error:
            raise JobFailedError(
                f"the newest version ({parent.id}) cannot be loaded to learn on: {error}. "
                "Repair or delete that version, then upload the task again"
            ) from error
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        expected = self.store.registry.class_names(parent.id)
        if learner.class_names != expected:
            raise JobFailedError(
                f"the state of version {parent.id} holds the classes {learner.class_names}, "
                f"but the registry lists {expected}; repair or delete that version"
            )
        return learner


# --- progress, heartbeat ------------------------------------------------------------


class _Heartbeat(threading.Thread):
    """Renews the running job's lease every quarter of it, between progress reports too
    (loading a large state, publishing), and notices a cancel or a lost lock."""

    def __init__(
        self, jobs: Jobs, lock: UpdateLock, job_id: int, attempt: int, lease_seconds: float
    ) -> None:
        super().__init__(name=f"dmc-heartbeat-{job_id}", daemon=True)
        self.jobs = jobs
        self.lock = lock
        self.job_id = job_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.interval = max(0.05, lease_seconds / 4)
        self.cancelled = threading.Event()
        self.lost: Exception | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.lock.check()
                self.jobs.renew(self.job_id, attempt=self.attempt, lease_seconds=self.lease_seconds)
            except JobStateError:
                self.cancelled.set()
                return
            except (LeaseLostError, LockLostError) as error:
                self.lost = error
                return
            except Exception as error:  # a database blip: the next beat tries again
                log.warning("job %d: heartbeat failed: %s", self.job_id, error)

    def halt(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()


class _ProgressWriter:
    """The learner's progress callback: overall percent, throttled writes, and the checks
    that stop a run (cancel, lost claim, worker stopping) by raising."""

    def __init__(
        self,
        jobs: Jobs,
        job_id: int,
        attempt: int,
        *,
        lease_seconds: float,
        interval: float,
        heartbeat: _Heartbeat,
        stop: threading.Event,
    ) -> None:
        self.jobs = jobs
        self.job_id = job_id
        self.attempt = attempt
        self.lease_seconds = lease_seconds
        self.interval = interval
        self.heartbeat = heartbeat
        self.stop = stop
        self.tracker = ProgressTracker([])
        self._stage = ""
        self._written = -math.inf

    def learning(self, stages: list[str]) -> None:
        self.tracker = ProgressTracker(stages, start=LEARN_START, end=SAVE_PERCENT)

    def phase(self, stage: str, percent: float) -> None:
        """A step of the job outside the learner (load, save, publish): always written."""
        self._check()
        self._write(stage, 0, 1, percent)

    def __call__(self, stage: str, step: int, total: int) -> None:
        self._check()
        percent = self.tracker.update(stage, step, total)
        now = time.monotonic()
        if stage != self._stage or step >= total or now - self._written >= self.interval:
            self._write(stage, step, total, percent)

    def _check(self) -> None:
        if self.stop.is_set():
            raise WorkerStoppingError()
        if self.heartbeat.cancelled.is_set():
            raise JobCancelledError()
        if self.heartbeat.lost is not None:
            raise LockLostError(str(self.heartbeat.lost))

    def _write(self, stage: str, step: int, total: int, percent: float) -> None:
        try:
            self.jobs.renew(
                self.job_id,
                attempt=self.attempt,
                lease_seconds=self.lease_seconds,
                stage=stage,
                step=step,
                total=total,
                percent=percent,
            )
        except JobStateError as error:
            raise JobCancelledError() from error
        except _CONNECTION_ERRORS as error:
            # The heartbeat keeps the lease while the database is unreachable for a
            # moment; a lost claim surfaces through it.
            log.warning("job %d: progress not recorded: %s", self.job_id, error)
        self._stage = stage
        self._written = time.monotonic()


# --- helpers ------------------------------------------------------------------------


def _seconds_to_expiry(running: list[JobInfo], lease_seconds: float) -> float:
    now = datetime.now(UTC)
    expiries = [j.lease_expires_at for j in running if j.lease_expires_at is not None]
    if not expiries:
        return 0.05
    wait = (min(expiries) - now).total_seconds() + 0.05
    return min(max(wait, 0.05), lease_seconds)


def _failure_message(error: Exception) -> str:
    if isinstance(error, JobFailedError):
        return str(error)
    if isinstance(error, TaskError):
        return f"the task cannot be learned: {error}. Fix the upload and submit it again"
    if isinstance(error, DuplicateClassError):
        return f"{error}; class names must be new, so rename them and upload the task again"
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return (
            "the GPU ran out of memory while learning the task; lower stage1.batch_size "
            "(DMC_LEARNER_OVERRIDES) or use a larger GPU, then upload the task again"
        )
    detail = str(error) or type(error).__name__
    return (
        f"the update failed unexpectedly ({type(error).__name__}: {detail}); this is not a "
        "problem with the upload itself: see the worker logs, then upload the task again"
    )


def _metrics(
    job: JobInfo,
    task_id: int,
    learner: Learner,
    report: dict[str, Any],
    seconds: dict[str, float],
    started: float,
) -> dict[str, Any]:
    timings = dict(seconds)
    timings.update({f"learn_{k}": v for k, v in report.get("seconds", {}).items()})
    duration = time.perf_counter() - started
    timings["total"] = duration
    metrics = {
        "task_id": task_id,
        "job_id": job.id,
        "attempt": job.attempts,
        "method": learner.config.method,
        "backbone": learner.backbone.spec.id,
        "device": str(learner.device),
        "task_index": report.get("task"),
        "images_per_class": report.get("images_per_class", {}),
        "image_count": sum(report.get("images_per_class", {}).values()),
        "train_accuracy": report.get("train_accuracy"),
        "stage1_train_accuracy": report.get("stage1_train_accuracy"),
        "stage1_loss": report.get("stage1_loss"),
        "stage2_loss": report.get("stage2_loss"),
        "calibration": report.get("calibration"),
        "seconds": timings,
        "duration_seconds": duration,
    }
    return _jsonable(metrics)


def _jsonable(value: Any) -> Any:
    """JSON-safe copy: numbers as float or int, non-finite floats as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str | int):
        return value
    if isinstance(value, float) or hasattr(value, "__float__"):
        number = float(value)
        return number if math.isfinite(number) else None
    return json.loads(json.dumps(value, default=str))


def _quietly(action: Callable[[], T], default: T) -> T:
    try:
        return action()
    except Exception as error:
        log.warning("%s", error)
        return default


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
