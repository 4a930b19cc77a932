"""The loop that runs the queued jobs; one run of a job is `worker.run`, its heartbeat and
progress `worker.heartbeat`.

Both dispatchers (Celery, embedded thread) call `JobRunner.run_pending(job_id)` when a job
is announced. The message is only a wake-up: the runner takes the update lock (one
runner at a time across all workers; see `worker.locking`), then claims and runs the
oldest queued job, again and again until none is left, so updates apply one at a time in
submission order, each on the version active when it starts (or the task's base version).

One run of a job (`attempts` is its fencing token):
1. load the task's images (if its kind has any) and decode them; load the state of the
   version it builds on (or build the base learner when there is none);
2. apply the task (`worker.task_kinds`: `Learner.learn_task`, `extend_classes`,
   `remove_classes` or `rename_class`), writing progress (stage, step, total, overall
   percent) to the job at most every `job_progress_interval_seconds`; each write also
   renews the lease and sees a cancel; a heartbeat thread renews the lease in between;
3. save the state, publish it as a child of that version and, in the same
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

import logging
import os
import socket
import threading
from datetime import UTC, datetime

from store.jobs import JobInfo
from store.models import JobState
from store.service import Store
from worker.errors import CONNECTION_ERRORS
from worker.locking import LockLostError, UpdateLock, make_update_lock
from worker.run import JobExecutor, JobOutcome, release_uploads
from worker.settings import WorkerSettings

__all__ = ["JobOutcome", "JobRunner", "default_worker_name"]

log = logging.getLogger(__name__)


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
        self._executor = JobExecutor(store, settings, self.name, self.stop)

    @property
    def busy(self) -> bool:
        """Whether this runner is inside `run_pending` now."""
        return self._busy.locked()

    def run_pending(self, job_id: int | None = None) -> list[JobOutcome]:
        """What a dispatcher calls when job `job_id` is announced (None: a sweep): run the
        queued jobs in submission order, that one among them. Returns the runs made here;
        none when another runner holds the update lock (it will get to the job)."""
        if job_id is not None:
            log.debug("job %d announced", job_id)
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
                except CONNECTION_ERRORS as error:
                    log.warning("cannot reach the database to take the update lock: %s", error)
                    return outcomes
                try:
                    self._drain(lock, outcomes)
                except (LockLostError, *CONNECTION_ERRORS) as error:
                    log.warning("stopped running jobs: %s", error)
                    return outcomes
                finally:
                    lock.release()
                # A job submitted while the lock was being released found it taken: look
                # again now that it is free.
                try:
                    if not self.store.jobs.has_pending():
                        return outcomes
                except CONNECTION_ERRORS:
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
            outcomes.append(self._executor.run(job, lock))

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
                release_uploads(self.store, task_id)


def _seconds_to_expiry(running: list[JobInfo], lease_seconds: float) -> float:
    now = datetime.now(UTC)
    expiries = [j.lease_expires_at for j in running if j.lease_expires_at is not None]
    if not expiries:
        return 0.05
    wait = (min(expiries) - now).total_seconds() + 0.05
    return min(max(wait, 0.05), lease_seconds)
