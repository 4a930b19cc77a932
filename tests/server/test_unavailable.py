"""Issue 14 (2): the database or the object store unreachable or too slow is a 503 with
Retry-After (was a 500 "internal error"), through the app's own exception handlers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from server.errors import install_handlers
from store.objects import S3ObjectStore
from store.settings import StoreSettings
from tests.server.conftest import free_port


def unreachable_database() -> None:
    engine = create_engine(
        f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none",
        connect_args={"connect_timeout": 2},
    )
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))


def unreachable_object_store() -> None:
    settings = StoreSettings(
        object_store="s3",
        s3_bucket="dmc",
        s3_endpoint_url=f"http://127.0.0.1:{free_port()}",
        s3_region="us-east-1",
        s3_access_key_id="x",
        s3_secret_access_key="y",
        s3_connect_timeout_seconds=0.5,
        s3_read_timeout_seconds=0.5,
    )
    S3ObjectStore.from_settings(settings).get_bytes("versions/1/manifest.json")


def pool_exhausted() -> None:
    raise PoolTimeoutError("QueuePool limit of size 5 overflow 10 reached")


@pytest.mark.parametrize(
    ("fail", "what"),
    [
        (unreachable_database, "database"),
        (pool_exhausted, "database"),
        (unreachable_object_store, "object store"),
    ],
)
def test_an_unavailable_backend_is_503_with_retry_after(
    fail: Callable[[], None], what: str
) -> None:
    app = FastAPI()
    install_handlers(app)

    @app.get("/fails")
    def fails() -> None:
        fail()

    response = TestClient(app, raise_server_exceptions=False).get("/fails")
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert f"the {what} is unavailable" in response.json()["detail"]
