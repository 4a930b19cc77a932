"""The Celery app's configuration and the `dmc worker` command (no broker needed)."""

from __future__ import annotations

import warnings
from pathlib import Path

from typer.testing import CliRunner

from tests.worker.helpers import settings_for
from worker.celery_app import TASK_NAME, celery_config, create_app, worker_argv


def test_celery_is_set_up_for_long_jobs(tmp_path: Path, checkpoint: Path) -> None:
    settings = settings_for(tmp_path, checkpoint, celery_queue="updates")
    config = celery_config(settings)
    assert config["worker_pool"] == "solo" and config["worker_concurrency"] == 1
    assert config["worker_prefetch_multiplier"] == 1
    assert config["task_acks_late"] is False
    assert config["broker_transport_options"]["visibility_timeout"] >= 3600
    argv = worker_argv(settings, hostname="n@h")
    assert {"--pool=solo", "--concurrency=1", "--queues=updates", "--hostname=n@h"} <= set(argv)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a task name registered twice
        apps = [create_app(settings, upgrade=False) for _ in range(2)]
    for app in apps:
        # Each app runs its own runtime's task (not one shared by every app).
        assert app.tasks[TASK_NAME].app is app
        assert app.conf.task_default_queue == "updates"
        assert app.conf.task_acks_late is False
        app.close()


def test_dmc_worker_command_is_there() -> None:
    from dmc_cli.main import app

    result = CliRunner().invoke(app, ["worker", "--help"])
    assert result.exit_code == 0
    assert "--queue" in result.output and "--no-upgrade" in result.output
