"""Fixtures for the worker tests: the tiny model, a fresh PostgreSQL database per test,
Redis queues of this session, and `dmc worker` processes that are always stopped.

PostgreSQL comes from DMC_TEST_POSTGRES_URL (default postgres@127.0.0.1:5432) and Redis
from DMC_TEST_REDIS_URL (default redis://127.0.0.1:6379/9). When a variable is unset and
its server cannot be reached, the tests that need it are skipped; when it is set, they
fail instead. Each test gets its own database (a copy of a migrated template) and its own
queue name; the session's Redis keys are deleted at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url

from store.service import Store
from tests.services import delete_redis_keys, postgres_database, redis_client
from tests.worker.helpers import make_checkpoint, settings_env
from worker.settings import WorkerSettings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "dmc-tiny-vit.pt")


# --- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_template() -> Iterator[str]:
    """The name of a migrated template database for this session."""
    with postgres_database("dmc_worker_tmpl") as url:
        yield make_url(url).database or ""


@pytest.fixture
def postgres_url(postgres_template: str) -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one test."""
    with postgres_database("dmc_worker_test", template=postgres_template) as url:
        yield url


# --- Redis -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_session() -> Iterator[tuple[str, str]]:
    """(broker URL, prefix of this session's queue names); the keys go at the end."""
    prefix = f"dmc-test-{uuid.uuid4().hex[:10]}"
    with redis_client() as (url, client):
        try:
            yield url, prefix
        finally:
            delete_redis_keys(client, prefix)


@pytest.fixture
def queue(redis_session: tuple[str, str]) -> str:
    return f"{redis_session[1]}-{uuid.uuid4().hex[:6]}"


# --- stores and workers ----------------------------------------------------------------


@pytest.fixture
def pg_env(
    postgres_url: str,
    tmp_path: Path,
    checkpoint: Path,
    redis_session: tuple[str, str],
    queue: str,
) -> dict[str, str]:
    """The DMC_* environment shared by this test's workers and its own store."""
    return settings_env(
        database_url=postgres_url,
        objects_dir=tmp_path / "objects",
        checkpoint=checkpoint,
        DMC_BROKER_URL=redis_session[0],
        DMC_CELERY_QUEUE=queue,
        DMC_DISPATCHER="celery",
    )


@pytest.fixture
def pg_settings(pg_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    for name, value in pg_env.items():
        monkeypatch.setenv(name, value)
    return WorkerSettings()


@pytest.fixture
def pg_store(pg_settings: WorkerSettings) -> Iterator[Store]:
    store = Store.open(pg_settings)
    yield store
    store.close()


class WorkerProcess:
    """A `dmc worker` subprocess; its output goes to a log file."""

    def __init__(self, name: str, node: str, env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dmc_cli.main", "worker", f"--hostname={node}"],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while " ready." not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"worker {self.name} exited:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"worker {self.name} not ready:\n{self.log()[-3000:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (Celery's warm shutdown), then SIGKILL if it does not exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)
        self._log.close()
        return self.process.returncode


@pytest.fixture
def start_worker(
    pg_env: dict[str, str],
    tmp_path: Path,
    queue: str,
    request: pytest.FixtureRequest,
) -> Iterator[Callable[..., WorkerProcess]]:
    """Start `dmc worker` processes for this test; all are stopped at its end."""
    started: list[WorkerProcess] = []

    def start(name: str, **env: str) -> WorkerProcess:
        full = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DMC_") or k.startswith("DMC_TEST_")
        }
        full.update(pg_env)
        full.update(env)
        full.update(
            {
                "OMP_NUM_THREADS": "1",
                "PYTHONUNBUFFERED": "1",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
            }
        )
        node = f"{name}-{queue}@test"  # the session prefix: its mailbox is cleaned up
        worker = WorkerProcess(name, node, full, tmp_path / f"worker-{name}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for worker in started:
            print(f"--- worker {worker.name} log (tail) ---\n{worker.log()[-4000:]}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
