"""Class lifecycle: every version lists all its classes (names unique within a version, no
longer across all versions), records what it changed against its parent, and tasks have
a kind (add, extend, remove, rename), an optional base version and arguments.

Existing versions are filled in: each one's class list is its parent's plus the classes it
introduced, and its change is "add" of those.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_versions = sa.table(
    "versions",
    sa.column("id", sa.Integer),
    sa.column("parent_id", sa.Integer),
    sa.column("change", sa.JSON),
)
_classes = sa.table(
    "classes",
    sa.column("id", sa.Integer),
    sa.column("name", sa.String),
    sa.column("ordinal", sa.Integer),
    sa.column("version_id", sa.Integer),
    sa.column("task_id", sa.Integer),
    sa.column("since_version_id", sa.Integer),
)


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("change", sa.JSON(), nullable=True))
    with op.batch_alter_table("classes") as batch:
        batch.add_column(sa.Column("since_version_id", sa.Integer(), nullable=True))
        batch.drop_constraint(op.f("uq_classes_name"), type_="unique")
        batch.create_unique_constraint("uq_classes_version_id_name", ["version_id", "name"])
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column(
                "kind",
                sa.String(length=16),
                sa.CheckConstraint(
                    "kind IN ('add', 'extend', 'remove', 'rename')", name=op.f("ck_tasks_task_kind")
                ),
                nullable=False,
                server_default="add",
            )
        )
        batch.add_column(sa.Column("base_version_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("arguments", sa.JSON(), nullable=True))
        batch.create_foreign_key(
            op.f("fk_tasks_base_version_id_versions"),
            "versions",
            ["base_version_id"],
            ["id"],
            ondelete="SET NULL",
        )
    _fill_in_class_lists()


def _fill_in_class_lists() -> None:
    """Each version's full class list: its parent's, then the classes it introduced."""
    bind = op.get_bind()
    own: dict[int, list[dict[str, Any]]] = {}
    for row in bind.execute(
        sa.select(_classes.c.name, _classes.c.version_id, _classes.c.task_id).order_by(
            _classes.c.version_id, _classes.c.ordinal
        )
    ):
        own.setdefault(row.version_id, []).append(
            {"name": row.name, "task_id": row.task_id, "since_version_id": row.version_id}
        )
    full: dict[int, list[dict[str, Any]]] = {}
    versions = bind.execute(
        sa.select(_versions.c.id, _versions.c.parent_id).order_by(_versions.c.id)
    ).all()
    for row in versions:  # parents have lower ids
        version_id, parent_id = int(row.id), row.parent_id
        introduced = own.get(version_id, [])
        full[version_id] = [*full.get(parent_id, []), *introduced] if parent_id else introduced
        change = {"kind": "add", "classes": [c["name"] for c in introduced], "renamed": {}}
        bind.execute(_versions.update().where(_versions.c.id == version_id).values(change=change))
    bind.execute(_classes.delete())
    rows = [
        {**entry, "ordinal": i, "version_id": version_id}
        for version_id, entries in full.items()
        for i, entry in enumerate(entries)
    ]
    if rows:
        bind.execute(_classes.insert(), rows)


def downgrade() -> None:
    # Back to "a version records the classes it introduced": its added classes only.
    # (Fails where a name was learned again on two branches: that needs the new schema.)
    bind = op.get_bind()
    bind.execute(
        _classes.delete().where(
            sa.or_(
                _classes.c.since_version_id.is_(None),
                _classes.c.since_version_id != _classes.c.version_id,
            )
        )
    )
    with op.batch_alter_table("tasks") as batch:
        batch.drop_constraint(op.f("fk_tasks_base_version_id_versions"), type_="foreignkey")
        batch.drop_constraint(op.f("ck_tasks_task_kind"), type_="check")
        batch.drop_column("arguments")
        batch.drop_column("base_version_id")
        batch.drop_column("kind")
    with op.batch_alter_table("classes") as batch:
        batch.drop_constraint("uq_classes_version_id_name", type_="unique")
        batch.create_unique_constraint(op.f("uq_classes_name"), ["name"])
        batch.drop_column("since_version_id")
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("change")
