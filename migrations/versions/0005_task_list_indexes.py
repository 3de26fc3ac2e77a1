"""The task list's indexes: an account's tasks newest first, by status, by name and status

``GET /api/v1/tasks`` reads a keyset range of (created_at, id) after equalities on
account (and status, and name): each of these indexes holds those columns in that order,
so a page reads the rows it returns and no more, at any table size. The id ends each
index so that tasks created in the same microsecond keep one order across pages.
ix_tasks_account_created_at is a prefix of ix_tasks_account_created_at_id, so it goes.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = {
    "ix_tasks_account_created_at_id": ["account", "created_at", "id"],
    "ix_tasks_account_status_created_at_id": ["account", "status", "created_at", "id"],
    "ix_tasks_account_name_status_created_at_id": [
        "account",
        "name",
        "status",
        "created_at",
        "id",
    ],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "tasks", columns)
    op.drop_index("ix_tasks_account_created_at", table_name="tasks")


def downgrade() -> None:
    op.create_index("ix_tasks_account_created_at", "tasks", ["account", "created_at"])
    for name in INDEXES:
        op.drop_index(name, table_name="tasks")
