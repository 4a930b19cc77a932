"""Issue 14 (2): predict does not depend on the database. With a table lock held by
another connection and more GET /versions waiting on it than the default thread pool has
threads, a predict still answers; a call over the statement timeout is a 503 with
Retry-After (PostgreSQL, where `statement_timeout` is set on every connection)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, text

from server.settings import ServerSettings
from store.service import Store
from tests.server.conftest import ADMIN_KEY, free_port, live_server
from tests.server.test_predict import jpeg
from tests.services import postgres_database

ADMIN = {"X-API-Key": ADMIN_KEY}


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with postgres_database("dmc_server_test") as url:
        yield url


def start(
    settings_factory: Callable[..., ServerSettings],
    states: dict[str, Path],
    url: str,
    **overrides: object,
) -> tuple[ServerSettings, str]:
    """Settings on `url` with version 1 published, and a predict key."""
    settings = settings_factory(database_url=url, port=free_port(), **overrides)
    store = Store.open(settings)
    try:
        store.registry.publish(
            states["v1"], parent_id=None, new_classes=["red", "green"], activate=True
        )
        key = store.api_keys.create("predictor", ["predict"])[1]
    finally:
        store.close()
    return settings, key


def wait_ready(client: httpx.Client) -> None:
    deadline = time.monotonic() + 60
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, client.get("/readyz").text
        time.sleep(0.05)


def lock_waiters(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
            return int(connection.scalar(text(query)) or 0)
    finally:
        engine.dispose()


def test_predict_answers_while_get_versions_wait_on_a_table_lock(
    settings_factory: Callable[..., ServerSettings], states: dict[str, Path], postgres_url: str
) -> None:
    settings, key = start(
        settings_factory, states, postgres_url, database_statement_timeout_seconds=120.0
    )
    # More than the default thread pool's threads (min(32, CPUs + 4)).
    waiting = min(32, (os.cpu_count() or 1) + 4) + 2
    locker = create_engine(postgres_url)
    with (
        live_server(settings) as url,
        httpx.Client(base_url=url, timeout=120) as client,
        ThreadPoolExecutor(waiting + 1) as pool,
        locker.connect() as connection,
    ):
        wait_ready(client)
        connection.execute(text("LOCK TABLE versions IN ACCESS EXCLUSIVE MODE"))
        gets = [pool.submit(client.get, "/versions", headers=ADMIN) for _ in range(waiting)]
        deadline = time.monotonic() + 30
        while lock_waiters(postgres_url) < 3:
            assert time.monotonic() < deadline, "the GET /versions did not reach the lock"
            time.sleep(0.05)
        time.sleep(0.5)  # the rest of them queue up too

        files = [("images", ("a.jpg", jpeg(), "image/jpeg"))]
        answer = pool.submit(client.post, "/predict", files=files, headers={"X-API-Key": key})
        response = answer.result(timeout=30)  # the key is new: looked up in the store
        assert response.status_code == 200, response.text
        assert response.json()["version_id"] == 1
        assert not any(get.done() for get in gets), "the lock was not holding them up"

        connection.rollback()
        assert {get.result(timeout=60).status_code for get in gets} == {200}
    locker.dispose()


def test_a_statement_over_the_timeout_is_503_with_retry_after(
    settings_factory: Callable[..., ServerSettings], states: dict[str, Path], postgres_url: str
) -> None:
    settings, _ = start(
        settings_factory, states, postgres_url, database_statement_timeout_seconds=1.0
    )
    locker = create_engine(postgres_url)
    with (
        live_server(settings) as url,
        httpx.Client(base_url=url, timeout=60) as client,
        locker.connect() as connection,
    ):
        wait_ready(client)
        connection.execute(text("LOCK TABLE versions IN ACCESS EXCLUSIVE MODE"))
        started = time.monotonic()
        response = client.get("/versions", headers=ADMIN)
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == str(settings.retry_after_seconds)
        assert "database" in response.json()["detail"]
        assert time.monotonic() - started < 30
        connection.rollback()
        assert client.get("/versions", headers=ADMIN).status_code == 200
    locker.dispose()
