"""`dmc worker`: a Celery worker that runs the update jobs (deployed mode)."""

from __future__ import annotations

from typing import Annotated

import typer


def run_worker(
    queue: Annotated[
        str | None, typer.Option(help="queue to consume; default: DMC_CELERY_QUEUE / settings")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level")] = "INFO",
    hostname: Annotated[
        str | None, typer.Option(help="Celery node name; default: dmc-<pid>@<host>")
    ] = None,
    upgrade: Annotated[
        bool, typer.Option(help="apply the database migrations before taking jobs")
    ] = True,
) -> None:
    """Run a Celery worker for the update jobs: solo pool, one job at a time.

    Settings come from the DMC_* environment (database, objects, broker, model).

    Start as many workers as you like: the jobs still run one at a time, in order.
    """
    import importlib
    import os

    from worker.celery_app import create_app, worker_argv
    from worker.settings import WorkerSettings

    # Import the model stack now, so the first job does not pay for it.
    importlib.import_module("worker.jobs")

    settings = WorkerSettings(celery_queue=queue) if queue else WorkerSettings()
    app = create_app(settings, upgrade=upgrade)
    name = hostname or f"dmc-{os.getpid()}@%h"
    app.worker_main(worker_argv(settings, loglevel=loglevel, hostname=name))
