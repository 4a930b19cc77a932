"""The migrations build exactly the models' schema, on SQLite and PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, inspect, text
from sqlalchemy.engine import make_url

from store.db import Database, alembic_config, make_engine, upgrade_database
from store.models import Base
from store.objects import LocalObjectStore
from store.registry import Registry

REPO = Path(__file__).resolve().parents[2]
TABLES = {
    "versions",
    "classes",
    "tasks",
    "jobs",
    "aliases",
    "api_keys",
    "garbage_counts",
    "evaluation_sets",
    "evaluations",
    "alembic_version",
}


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database with no tables at all (a fresh one on the PostgreSQL server)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite'}"
        return
    session_url = make_url(request.getfixturevalue("postgres_url"))
    name = f"{session_url.database}_m{uuid.uuid4().hex[:6]}"
    admin = create_engine(session_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield session_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def drift(url: str, metadata: MetaData = Base.metadata) -> list[object]:
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, metadata))
    finally:
        engine.dispose()


def test_migrations_match_the_models(empty_database: str) -> None:
    upgrade_database(empty_database)
    assert drift(empty_database) == []

    # The comparison does see a difference when there is one.
    changed = MetaData()
    for table in Base.metadata.sorted_tables:
        table.to_metadata(changed)
    Table("extra", changed, Column("id", Integer, primary_key=True))
    assert drift(empty_database, changed) != []


def test_upgrade_is_repeatable_and_reversible(empty_database: str) -> None:
    upgrade_database(empty_database)
    upgrade_database(empty_database)  # already at head: nothing to do

    engine = make_engine(empty_database)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as connection:
            config = alembic_config()
            config.attributes["connection"] = connection
            command.downgrade(config, "base")
            connection.commit()
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    upgrade_database(empty_database)
    assert drift(empty_database) == []


def test_alembic_command_line_reads_the_settings(tmp_path: Path) -> None:
    database = tmp_path / "cli.sqlite"
    env = {**os.environ, "DMC_DATABASE_URL": f"sqlite:///{database}"}
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    assert drift(f"sqlite:///{database}") == []


def test_0005_fills_in_each_versions_class_list(empty_database: str, tmp_path: Path) -> None:
    upgrade_database(empty_database, revision="0004")
    engine = make_engine(empty_database)
    try:
        with engine.begin() as connection:
            for vid, parent in ((1, None), (2, 1), (3, 1)):
                connection.execute(
                    text(
                        "INSERT INTO versions (id, parent_id, created_at, class_count, metrics,"
                        " state_location, checksum, files) VALUES (:id, :parent,"
                        " CURRENT_TIMESTAMP, 0, '{}', :loc, 'x', '{}')"
                    ),
                    {"id": vid, "parent": parent, "loc": f"versions/{vid}/"},
                )
            for cid, name, ordinal, vid in ((1, "cat", 0, 1), (2, "dog", 1, 1), (3, "owl", 0, 2)):
                connection.execute(
                    text(
                        "INSERT INTO classes (id, name, ordinal, version_id)"
                        " VALUES (:id, :name, :ordinal, :vid)"
                    ),
                    {"id": cid, "name": name, "ordinal": ordinal, "vid": vid},
                )
    finally:
        engine.dispose()
    upgrade_database(empty_database)
    registry = Registry(Database.from_url(empty_database), LocalObjectStore(tmp_path / "o"))
    try:
        assert registry.class_names(2) == ["cat", "dog", "owl"]
        assert registry.class_names(3) == ["cat", "dog"]
        assert [(c.name, c.version_id) for c in registry.classes(2)] == [
            ("cat", 1),
            ("dog", 1),
            ("owl", 2),
        ]
        assert registry.get(2).change == {"kind": "add", "classes": ["owl"], "renamed": {}}
        assert registry.get(3).new_classes == ()
    finally:
        registry.db.dispose()
