"""Issue 14 (2): every database call is bounded. The store's settings put a connect and a
statement timeout on PostgreSQL connections and a busy timeout on SQLite's; a statement
kept waiting by a lock fails with `OperationalError` (the API answers 503) instead of
waiting for ever."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from store.db import Timeouts, make_engine
from store.service import Store
from store.settings import StoreSettings


def test_a_statement_kept_waiting_by_a_lock_times_out(database_url: str) -> None:
    engine = make_engine(database_url, timeouts=Timeouts(connect=5, statement=0.5, pool=5))
    holder = make_engine(database_url)
    try:
        with holder.connect() as locking:
            if engine.dialect.name == "postgresql":
                locking.execute(text("LOCK TABLE versions IN ACCESS EXCLUSIVE MODE"))
                query = "SELECT count(*) FROM versions"
            else:
                query = "DELETE FROM aliases"  # a writer: waits for the other writer
                locking.execute(text(query))
            started = time.monotonic()
            with pytest.raises(OperationalError), engine.begin() as connection:
                connection.execute(text(query))
            assert time.monotonic() - started < 10
            locking.rollback()
        with engine.connect() as connection:
            assert connection.scalar(text("SELECT 1")) == 1
    finally:
        engine.dispose()
        holder.dispose()


def test_the_timeouts_come_from_the_settings(database_url: str) -> None:
    settings = StoreSettings(
        database_url=database_url,
        database_statement_timeout_seconds=2.5,
        database_connect_timeout_seconds=3,
    )
    store = Store.open(settings)
    try:
        with store.db.read() as session:
            if store.db.dialect == "postgresql":
                assert session.scalar(text("SHOW statement_timeout")) == "2500ms"
            else:
                assert session.scalar(text("PRAGMA busy_timeout")) == 2500
    finally:
        store.close()
