"""The update lock: at most one job runs at a time, across every worker of a deployment.

Whoever holds it may claim and run jobs; it is released by the operating system or the
database when its holder dies, so a killed worker never leaves it taken.

- PostgreSQL: a session-level advisory lock on a connection of its own.
- SQLite file: an exclusive `flock` on a file beside the database (workers of the
  embedded mode share a machine with their database file).
- SQLite in memory: a lock of this process.
"""

from __future__ import annotations

import logging
import os
import threading
from abc import ABC, abstractmethod
from pathlib import Path

from sqlalchemy import Connection, text

from store.db import Database
from worker.errors import WorkerError

log = logging.getLogger(__name__)

# Arbitrary constant ("dmc" + 1); store.db uses 0x646D63 for its migrations.
ADVISORY_LOCK_ID = 0x646D6301

_memory_locks: dict[str, threading.Lock] = {}
_memory_locks_guard = threading.Lock()


class LockLostError(WorkerError, RuntimeError):
    """The update lock is no longer held (its database connection broke)."""


class UpdateLock(ABC):
    """Not re-entrant; one holder at a time, also between objects of the same process."""

    @abstractmethod
    def acquire(self) -> bool:
        """Take the lock if it is free; never waits. Returns whether it is now held."""

    @abstractmethod
    def check(self) -> None:
        """Raise `LockLostError` unless the lock is still held."""

    @abstractmethod
    def release(self) -> None:
        """Give the lock back (no-op when not held)."""

    @property
    @abstractmethod
    def held(self) -> bool: ...


def make_update_lock(db: Database) -> UpdateLock:
    if db.dialect == "postgresql":
        return AdvisoryLock(db)
    if db.dialect == "sqlite":
        database = db.engine.url.database
        if not database or database == ":memory:":
            return ProcessLock(str(db.engine.url))
        return FileLock(Path(database).resolve().with_name(Path(database).name + ".jobs.lock"))
    raise ValueError(f"no update lock for database dialect {db.dialect!r}")


class AdvisoryLock(UpdateLock):
    def __init__(self, db: Database, lock_id: int = ADVISORY_LOCK_ID) -> None:
        self.db = db
        self.lock_id = lock_id
        self._connection: Connection | None = None

    @property
    def held(self) -> bool:
        return self._connection is not None

    def acquire(self) -> bool:
        if self._connection is not None:
            raise RuntimeError("the update lock is already held by this object")
        connection = self.db.engine.connect()
        try:
            taken = bool(
                connection.scalar(text("SELECT pg_try_advisory_lock(:id)"), {"id": self.lock_id})
            )
            # The lock belongs to the session, not the transaction: end the transaction so
            # the connection does not sit "idle in transaction" during a job.
            connection.commit()
        except BaseException:
            _discard(connection)
            raise
        if not taken:
            _discard(connection)
            return False
        self._connection = connection
        return True

    def check(self) -> None:
        connection = self._connection
        if connection is None:
            raise LockLostError("the update lock is not held")
        try:
            # If the connection had broken and been replaced, this session would not hold
            # the lock: ask the server, not the connection object.
            still = connection.scalar(
                text(
                    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' "
                    "AND pid = pg_backend_pid() AND granted AND objsubid = 1 "
                    "AND classid = :high AND objid = :low)"
                ),
                {"high": self.lock_id >> 32, "low": self.lock_id & 0xFFFFFFFF},
            )
            connection.commit()
        except Exception as error:
            raise LockLostError(f"the update lock's connection broke: {error}") from error
        if not still:
            raise LockLostError("the database no longer holds the update lock for this worker")

    def release(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": self.lock_id})
            connection.commit()
        except Exception as error:
            log.warning("could not release the update lock cleanly (%s); dropping it", error)
        finally:
            # Never hand a connection that may still hold the lock back to the pool.
            _discard(connection)


def _discard(connection: Connection) -> None:
    try:
        connection.invalidate()
    finally:
        connection.close()


class FileLock(UpdateLock):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> bool:
        import fcntl

        if self._fd is not None:
            raise RuntimeError("the update lock is already held by this object")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            # flock locks belong to the open file description: two opens conflict even
            # within one process, and the kernel drops the lock when the process dies.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return True

    def check(self) -> None:
        if self._fd is None:
            raise LockLostError("the update lock is not held")

    def release(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class ProcessLock(UpdateLock):
    def __init__(self, key: str) -> None:
        with _memory_locks_guard:
            self._lock = _memory_locks.setdefault(key, threading.Lock())
        self._held = False

    @property
    def held(self) -> bool:
        return self._held

    def acquire(self) -> bool:
        if self._held:
            raise RuntimeError("the update lock is already held by this object")
        self._held = self._lock.acquire(blocking=False)
        return self._held

    def check(self) -> None:
        if not self._held:
            raise LockLostError("the update lock is not held")

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lock.release()
