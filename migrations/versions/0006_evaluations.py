"""Evaluation sets and the evaluations of versions; a task's promotion gate; a job's note.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluation_sets",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=False),
        sa.Column("image_counts", sa.JSON(), nullable=False),
        sa.Column("location", sa.String(length=512), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_sets")),
        sa.UniqueConstraint("location", name=op.f("uq_evaluation_sets_location")),
        sa.UniqueConstraint("name", "revision", name=op.f("uq_evaluation_sets_name")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_evaluation_sets_name"), "evaluation_sets", ["name"])
    op.create_table(
        "evaluations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("evaluation_set_id", sa.Integer(), nullable=False),
        sa.Column("baseline_id", sa.Integer(), nullable=True),
        sa.Column("results", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["versions.id"],
            name=op.f("fk_evaluations_version_id_versions"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["evaluation_set_id"],
            ["evaluation_sets.id"],
            name=op.f("fk_evaluations_evaluation_set_id_evaluation_sets"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["baseline_id"],
            ["versions.id"],
            name=op.f("fk_evaluations_baseline_id_versions"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluations")),
        sqlite_autoincrement=True,
    )
    op.create_index(op.f("ix_evaluations_version_id"), "evaluations", ["version_id"])
    op.create_index(op.f("ix_evaluations_evaluation_set_id"), "evaluations", ["evaluation_set_id"])
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("gate", sa.JSON(), nullable=True))
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("note", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("note")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("gate")
    op.drop_table("evaluations")
    op.drop_table("evaluation_sets")
