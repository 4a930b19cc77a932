"""The embedded mode's dispatcher: one background thread of the server process runs the
jobs through the same `JobRunner` as the Celery worker, with the same job states."""

from __future__ import annotations

import logging
import threading

from store.service import Store
from worker.dispatch import Dispatcher
from worker.garbage import GarbageSchedule
from worker.jobs import JobRunner
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)


class EmbeddedDispatcher(Dispatcher):
    def __init__(
        self, settings: WorkerSettings, store: Store, *, runner: JobRunner | None = None
    ) -> None:
        super().__init__(store)
        self.settings = settings
        self.runner = runner or JobRunner(store, settings)
        self._stop = self.runner.stop
        self.garbage = GarbageSchedule(store, settings)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._guard = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        with self._guard:
            if self.running:
                return
            if self._stop.is_set():
                raise RuntimeError("a closed dispatcher cannot be started again")
            self._thread = threading.Thread(target=self._loop, name="dmc-jobs", daemon=True)
            # The first pass recovers what an earlier process left (queued or running jobs).
            self._wake.set()
            self._thread.start()

    def submit(self, job_id: int) -> None:
        self._wake.set()

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop the thread; a running job goes back to the queue at its next progress
        report, to be run again when the server starts next."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                log.warning("the job thread did not stop within %s seconds", timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(min(self.settings.job_sweep_seconds, self._to_garbage()))
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                self.runner.run_pending()
            except Exception:
                log.exception("the job thread hit an error; it goes on")
                self._stop.wait(1.0)
            self.garbage.run_if_due()

    def _to_garbage(self) -> float:
        wait = self.garbage.seconds_to_next
        return float("inf") if wait is None else wait
