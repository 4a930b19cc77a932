"""Fixtures for the store tests: SQLite and a real PostgreSQL, a local folder and S3 (moto).

PostgreSQL: a fresh database with a random name is created for the test session (built
by the migrations) and dropped at the end; each test starts from empty tables. The
server comes from DMC_TEST_POSTGRES_URL (default: postgres@127.0.0.1:5432). If that
variable is unset and the server cannot be reached, the PostgreSQL cases are skipped;
if it is set, they fail instead.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr
from sqlalchemy import create_engine, text

from store.db import Database
from store.models import Base
from store.objects import LocalObjectStore, ObjectStore, S3ObjectStore
from store.settings import StoreSettings
from tests.services import postgres_database


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_database("dmc_store_test") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: a copy of the template file, or the session's
    PostgreSQL database with every table emptied."""
    if request.param == "sqlite":
        path = tmp_path / "dmc.sqlite"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_url")
    engine = create_engine(url)
    tables = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()
    return url


@pytest.fixture
def db(database_url: str) -> Iterator[Database]:
    database = Database.from_url(database_url)
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_settings(s3_endpoint: str) -> StoreSettings:
    """Settings for a fresh, not yet created bucket on moto's server."""
    return StoreSettings(
        object_store="s3",
        s3_bucket=f"dmc-{uuid.uuid4().hex[:16]}",
        s3_endpoint_url=s3_endpoint,
        s3_region="us-east-1",
        s3_access_key_id="testing",
        s3_secret_access_key=SecretStr("testing"),
    )


@pytest.fixture(params=["local", "s3"])
def objects(request: pytest.FixtureRequest, tmp_path: Path) -> ObjectStore:
    """An empty object store: a local folder, or a fresh bucket on moto's server (HTTP)."""
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    store = S3ObjectStore.from_settings(request.getfixturevalue("s3_settings"))
    store.ensure_bucket()
    return store
