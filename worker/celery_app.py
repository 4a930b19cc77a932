"""Celery over Redis: the deployed mode's dispatcher and worker.

A message names a job, but only wakes a worker: the worker runs the queued jobs in order
through `JobRunner` (see `worker.jobs`), so what a message says, or whether it arrives
at all, never decides what runs. The job rows in the database are the queue.

Settings, for long GPU jobs:
- `worker_pool="solo"`, concurrency 1: the job runs in the worker's main process, never
  in a fork of a process that initialised CUDA; one job per worker at a time.
- `worker_prefetch_multiplier=1`: a busy worker holds at most one more wake-up.
- `task_acks_late=False`: a message is acknowledged when its task starts, so Redis never
  redelivers a message for a job that runs longer than the visibility timeout (a second
  copy would only be a wake-up, but it would arrive while the first still runs). A
  worker killed mid-job loses its message; that is fine, the job's row stays `running`,
  and the next worker to start (`worker_ready` sends a wake-up) or any idle worker's
  sweep (every `job_sweep_seconds`) runs it again once its lease has expired. Kombu's
  Redis redelivery of unacknowledged messages is not relied on.
- `visibility_timeout` (DMC_CELERY_VISIBILITY_TIMEOUT, 12 h) only bounds the redelivery
  of a wake-up a dead worker had prefetched.
- On a warm shutdown (SIGTERM) the running job is handed back to the queue at its next
  progress report and another worker is woken; SIGKILL is handled by the lease.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown, worker_shutting_down

from store.models import JobState
from store.service import Store
from worker.dispatch import Dispatcher
from worker.garbage import GarbageSchedule
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

TASK_NAME = "dmc.run_jobs"

_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.0, "interval_step": 0.5, "interval_max": 2}


def celery_config(settings: WorkerSettings) -> dict[str, Any]:
    return {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": {"visibility_timeout": settings.celery_visibility_timeout},
        "task_default_queue": settings.celery_queue,
        "task_routes": {TASK_NAME: {"queue": settings.celery_queue}},
        "task_acks_late": False,
        "task_reject_on_worker_lost": False,
        "task_ignore_result": True,
        "result_backend": None,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_publish_retry_policy": _PUBLISH_RETRY,
        "worker_pool": "solo",
        "worker_concurrency": 1,
        "worker_prefetch_multiplier": 1,
        "worker_send_task_events": False,
        "enable_utc": True,
    }


def worker_argv(
    settings: WorkerSettings, *, loglevel: str = "INFO", hostname: str | None = None
) -> list[str]:
    """The `celery worker` arguments that go with `celery_config` (they repeat it, as a
    command line wins over the configuration)."""
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        f"--queues={settings.celery_queue}",
        f"--loglevel={loglevel}",
        # No Celery sync between workers: the database coordinates them.
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv.append(f"--hostname={hostname}")
    return argv


class WorkerRuntime:
    """What a Celery worker process holds: the store, the runner, the sweeper thread."""

    def __init__(self, app: Celery, settings: WorkerSettings, *, upgrade: bool = True) -> None:
        self.app = app
        self.settings = settings
        self.upgrade = upgrade
        self.stop = threading.Event()
        self.name = f"celery:{os.getpid()}"
        self.ready = False
        self._runner: Any = None  # worker.jobs.JobRunner, imported when first needed
        self._guard = threading.Lock()
        self._sweeper: threading.Thread | None = None
        self._halt = threading.Event()
        # Signals are global; the receivers are bound methods held weakly, so they go
        # away with this runtime (and its app).
        worker_ready.connect(self.on_worker_ready)
        worker_shutting_down.connect(self.on_shutting_down)
        worker_shutdown.connect(self.on_worker_shutdown)

    @property
    def runner(self) -> Any:
        with self._guard:
            if self._runner is None:
                from worker.jobs import JobRunner

                store = Store.open(self.settings, upgrade=self.upgrade)
                self._runner = JobRunner(store, self.settings, name=self.name, stop=self.stop)
            return self._runner

    def run_jobs(self, job_id: int | None) -> int:
        outcomes = self.runner.run_pending(job_id)
        if any(o.state is JobState.QUEUED for o in outcomes):
            # This worker is stopping and handed a job back: wake another one.
            self.announce(None)
        return len(outcomes)

    def announce(self, job_id: int | None) -> None:
        send(self.app, self.settings, job_id)

    # --- signals ---------------------------------------------------------------------

    def on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not self.app:
            return
        self.name = f"{getattr(sender, 'hostname', 'celery')}:{os.getpid()}"
        self.ready = True
        self._sweeper = threading.Thread(target=self._sweep, name="dmc-sweeper", daemon=True)
        self._sweeper.start()
        try:
            _ = self.runner  # open the store (and migrate) before taking messages
            # Run whatever is queued, or was left running by a worker that died.
            self.announce(None)
        except Exception as error:
            log.error("worker start-up: %s; the sweep tries again", error)

    def on_shutting_down(self, **_: Any) -> None:
        if self.ready:
            self.stop.set()

    def on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if not self.ready or getattr(sender, "app", self.app) is not self.app:
            return
        self.stop.set()
        self._halt.set()
        if self._sweeper is not None:
            self._sweeper.join(timeout=5)
        if self._runner is not None:
            self._runner.store.close()

    def _sweep(self) -> None:
        """Wake the workers when jobs wait that nobody announced (a lost message, a dead
        worker's job), unless this worker is busy with them anyway; and collect garbage
        when it is due (`worker.garbage`), at the first pass too."""
        garbage = None
        while not self._halt.wait(self.settings.job_sweep_seconds):
            try:
                runner = self.runner
                if not runner.busy and runner.store.jobs.has_pending():
                    self.announce(None)
                if garbage is None:
                    garbage = GarbageSchedule(runner.store, self.settings)
                garbage.run_if_due()
            except Exception as error:
                log.warning("sweep failed: %s", error)


def send(app: Celery, settings: WorkerSettings, job_id: int | None) -> None:
    app.send_task(
        TASK_NAME,
        args=[job_id],
        queue=settings.celery_queue,
        retry=True,
        retry_policy=_PUBLISH_RETRY,
        ignore_result=True,
    )


def create_app(settings: WorkerSettings | None = None, *, upgrade: bool = True) -> Celery:
    """A Celery app for `settings` with the job task registered. As a worker it opens the
    store when ready (`upgrade`: apply the migrations first)."""
    settings = settings or WorkerSettings()
    app = Celery("dmc", set_as_current=False)
    app.conf.update(celery_config(settings))
    runtime = WorkerRuntime(app, settings, upgrade=upgrade)

    @app.task(name=TASK_NAME, ignore_result=True, acks_late=False, shared=False)
    def run_jobs(job_id: int | None = None) -> int:
        """Run the queued jobs in order (job `job_id` was announced)."""
        return runtime.run_jobs(job_id)

    app.dmc_runtime = runtime
    return app


class CeleryDispatcher(Dispatcher):
    """Announces jobs to the Celery workers through Redis."""

    def __init__(
        self, settings: WorkerSettings, store: Store, *, app: Celery | None = None
    ) -> None:
        super().__init__(store)
        self.settings = settings
        self.app = app or create_app(settings, upgrade=False)

    def submit(self, job_id: int) -> None:
        """Announce a queued job. If the broker cannot be reached the job still runs: it is
        in the database, and a worker's sweep finds it (logged as an error)."""
        try:
            send(self.app, self.settings, job_id)
        except Exception as error:
            log.error(
                "could not announce job %d to the broker at %s (%s); a worker's sweep will "
                "pick it up",
                job_id,
                self.settings.broker_url,
                error,
            )

    def close(self, timeout: float | None = None) -> None:
        self.app.close()


_default_app: Celery | None = None
_default_guard = threading.Lock()


def __getattr__(name: str) -> Any:
    """`app` (also `celery`): the app for the environment's settings, made on first use,
    for `celery -A worker.celery_app worker`."""
    global _default_app
    if name in ("app", "celery"):
        with _default_guard:
            if _default_app is None:
                _default_app = create_app()
            return _default_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
