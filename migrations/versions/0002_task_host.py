"""tasks.host for host: limits

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("host", sa.String(253), nullable=True))
    op.create_index("ix_tasks_status_host", "tasks", ["status", "host"])


def downgrade() -> None:
    op.drop_index("ix_tasks_status_host", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("host")
