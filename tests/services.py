"""The real PostgreSQL and Redis the integration tests use, shared by every test package.

The servers come from DMC_TEST_POSTGRES_URL and DMC_TEST_REDIS_URL (`make test` sets both,
so an unreachable server fails the run); when a variable is unset and its default server
cannot be reached, the tests that need it are skipped instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url

from store.db import upgrade_database

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/9"


def postgres_server() -> URL:
    explicit = os.environ.get("DMC_TEST_POSTGRES_URL")
    return make_url(explicit or DEFAULT_POSTGRES_URL).set(drivername="postgresql+psycopg")


@contextmanager
def postgres_database(prefix: str, *, template: str | None = None) -> Iterator[str]:
    """A new database named `<prefix>_<random>`, migrated (or copied from `template`),
    dropped at the end; yields its URL."""
    server = postgres_server()
    admin = create_engine(server, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    copy = f' TEMPLATE "{template}"' if template else ""
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{copy}'))
    except Exception as error:
        admin.dispose()
        if os.environ.get("DMC_TEST_POSTGRES_URL"):
            raise
        pytest.skip(f"PostgreSQL at {server.render_as_string()} is not reachable: {error}")
    url = server.set(database=name).render_as_string(hide_password=False)
    try:
        if template is None:
            upgrade_database(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def redis_client() -> Iterator[tuple[str, Any]]:
    """(URL, client) of the test Redis."""
    import redis

    url = os.environ.get("DMC_TEST_REDIS_URL") or DEFAULT_REDIS_URL
    client = redis.Redis.from_url(url)
    try:
        client.ping()
    except Exception as error:
        client.close()
        if os.environ.get("DMC_TEST_REDIS_URL"):
            raise
        pytest.skip(f"Redis at {url} is not reachable: {error}")
    try:
        yield url, client
    finally:
        client.close()


def delete_redis_keys(client: Any, marker: str) -> None:
    """Every key, queue binding and unacknowledged message (kombu's shared `unacked` hash,
    left by a killed worker) and remote-control mailbox whose name carries `marker`."""
    for key in client.scan_iter(match=f"*{marker}*"):
        client.delete(key)
    for tag, payload in client.hscan_iter("unacked"):
        if marker.encode() in payload:
            client.hdel("unacked", tag)
            client.zrem("unacked_index", tag)
    pidbox = "_kombu.binding.celery.pidbox"
    for member in client.smembers(pidbox):
        if marker.encode() in member:
            client.srem(pidbox, member)
    deadlines = "_kombu.binding_deadlines"
    for member in client.zrange(deadlines, 0, -1):
        if marker.encode() in member:
            client.zrem(deadlines, member)
    if not client.exists(pidbox):
        client.zrem(deadlines, "celery.pidbox")
