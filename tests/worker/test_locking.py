"""The update lock: a file, a process-local lock, a PostgreSQL advisory lock."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import text

from store.db import Database
from worker.locking import AdvisoryLock, FileLock, LockLostError, ProcessLock, make_update_lock


def test_file_lock_has_one_holder_and_dies_with_it(tmp_path: Path) -> None:
    first, second = FileLock(tmp_path / "x.lock"), FileLock(tmp_path / "x.lock")
    assert first.acquire() and first.held
    assert not second.acquire() and not second.held
    first.check()
    first.release()
    with pytest.raises(LockLostError):
        first.check()
    assert second.acquire()
    second.release()


def test_process_lock_for_in_memory_sqlite() -> None:
    db = Database.from_url("sqlite://")
    first, second = make_update_lock(db), make_update_lock(db)
    assert isinstance(first, ProcessLock)
    assert first.acquire() and not second.acquire()
    first.release()
    assert second.acquire()
    second.release()
    db.dispose()


def test_advisory_lock_on_postgresql(postgres_url: str) -> None:
    db = Database.from_url(postgres_url)
    try:
        first, second = make_update_lock(db), make_update_lock(db)
        assert isinstance(first, AdvisoryLock) and isinstance(second, AdvisoryLock)
        assert first.acquire() and not second.acquire()
        first.check()
        first.release()
        assert second.acquire()
        # The holder's connection dies (a killed worker): the lock is free again and the
        # holder finds out at its next check.
        connection = second._connection
        assert connection is not None
        with db.engine.connect() as admin:
            pid = connection.scalar(text("SELECT pg_backend_pid()"))
            connection.commit()
            admin.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        with pytest.raises(LockLostError):
            second.check()
        second.release()
        assert first.acquire()
        first.release()
    finally:
        db.dispose()
