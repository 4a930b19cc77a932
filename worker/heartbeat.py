"""While a job runs: the heartbeat thread that renews its lease, and the learner's progress
callback that writes the overall percent and stops the run on a cancel, a lost claim or a
stopping worker."""

from __future__ import annotations

import logging
import math
import threading
import time

from store.errors import JobStateError, LeaseLostError
from store.jobs import Jobs
from worker.errors import (
    CONNECTION_ERRORS,
    JobCancelledError,
    WorkerStoppingError,
)
from worker.locking import LockLostError, UpdateLock
from worker.progress import LEARN_START, SAVE_PERCENT, ProgressTracker

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
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


class ProgressWriter:
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
        heartbeat: Heartbeat,
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
        except CONNECTION_ERRORS as error:
            # The heartbeat keeps the lease while the database is unreachable for a
            # moment; a lost claim surfaces through it.
            log.warning("job %d: progress not recorded: %s", self.job_id, error)
        self._stage = stage
        self._written = time.monotonic()
