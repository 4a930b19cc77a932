"""Job leases and the task's activate flag: what the background worker needs.

`jobs.lease_expires_at` / `jobs.worker`: the heartbeat of a running job and who runs it.
`tasks.activate`: whether the version learned from the task becomes `active`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("activate", sa.Boolean(), nullable=False, server_default=sa.true())
        )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(length=200), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("worker")
        batch.drop_column("lease_expires_at")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("activate")
