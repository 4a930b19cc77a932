"""Engines, sessions and schema upgrades."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry, StaticPool

from store.settings import StoreSettings

log = logging.getLogger(__name__)

_WRITE_OPTION = "dmc_write"
# Arbitrary constant: serialises `upgrade_database` between processes on PostgreSQL.
_MIGRATION_LOCK_ID = 0x646D63


def normalize_url(url: str | URL) -> URL:
    """Parse `url`; a bare `postgresql://` gets the psycopg 3 driver, the one installed."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


@dataclass(frozen=True)
class Timeouts:
    """Bounds on database calls, in seconds (None: the driver's default)."""

    connect: float | None = None
    statement: float | None = None
    pool: float | None = None

    @classmethod
    def of(cls, settings: StoreSettings) -> Timeouts:
        return cls(
            connect=settings.database_connect_timeout_seconds,
            statement=settings.database_statement_timeout_seconds,
            pool=settings.database_pool_timeout_seconds,
        )


def make_engine(url: str | URL, *, echo: bool = False, timeouts: Timeouts | None = None) -> Engine:
    parsed = normalize_url(url)
    timeouts = timeouts or Timeouts()
    pool: dict[str, Any] = {"pool_timeout": timeouts.pool} if timeouts.pool else {}
    if parsed.get_backend_name() != "sqlite":
        connect_args: dict[str, Any] = {}
        if timeouts.connect:
            connect_args["connect_timeout"] = max(1, math.ceil(timeouts.connect))
        if timeouts.statement:
            connect_args["options"] = f"-c statement_timeout={int(timeouts.statement * 1000)}"
        return create_engine(
            parsed, echo=echo, pool_pre_ping=True, connect_args=connect_args, **pool
        )

    busy = timeouts.statement or 30.0  # how long a statement waits for a locked database
    kwargs: dict[str, Any] = {"connect_args": {"timeout": busy, "check_same_thread": False}}
    in_memory = parsed.database in (None, "", ":memory:")
    if in_memory:
        kwargs["poolclass"] = StaticPool
    else:
        kwargs.update(pool)
        Path(parsed.database or "").parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(parsed, echo=echo, **kwargs)
    _configure_sqlite(engine, wal=not in_memory)
    return engine


def _configure_sqlite(engine: Engine, *, wal: bool) -> None:
    # pysqlite defers BEGIN until the first write, so a transaction that reads and then
    # writes can fail at once with "database is locked" instead of waiting for the other
    # writer. We emit BEGIN ourselves; write transactions take the lock at the start.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        if wal:
            cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        write = connection.get_execution_options().get(_WRITE_OPTION, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


class Database:
    """An engine with two kinds of session: `read()` and `write()` (commits on success)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._readers = sessionmaker(engine, expire_on_commit=False)
        self._writers = sessionmaker(
            engine.execution_options(**{_WRITE_OPTION: True}), expire_on_commit=False
        )

    @classmethod
    def from_url(
        cls, url: str | URL, *, echo: bool = False, timeouts: Timeouts | None = None
    ) -> Database:
        return cls(make_engine(url, echo=echo, timeouts=timeouts))

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._readers() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        with self._writers.begin() as session:
            yield session

    def lock_table(self, session: Session, table: str) -> None:
        """Serialise writers of `table` until the transaction ends (SQLite: already so)."""
        if self.dialect == "postgresql":
            session.execute(text(f'LOCK TABLE "{table}" IN SHARE ROW EXCLUSIVE MODE'))

    def dispose(self) -> None:
        self.engine.dispose()


def migrations_dir() -> Path:
    # `migrations/` is a sibling top-level package, in the repository and when installed.
    return Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str | URL | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    if url is not None:
        rendered = normalize_url(url).render_as_string(hide_password=False)
        config.set_main_option("sqlalchemy.url", rendered.replace("%", "%%"))
    return config


def upgrade_database(url: str | URL | Engine, revision: str = "head") -> None:
    """Apply the migrations up to `revision` (the embedded mode calls this at start)."""
    engine = url if isinstance(url, Engine) else make_engine(url)
    try:
        config = alembic_config()
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                # Migrations may wait for each other and rewrite tables: no timeout.
                connection.execute(text("SET LOCAL statement_timeout = 0"))
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:id)"), {"id": _MIGRATION_LOCK_ID}
                )
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        if engine is not url:
            engine.dispose()
    log.info("database schema upgraded to %s", revision)
