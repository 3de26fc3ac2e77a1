"""Idempotency keys: each task may carry its client's key, unique within its account

``idempotency_key`` is the ``Idempotency-Key`` header (bulk: the item's field) and
``request_hash`` the digest of the request it came with (throttler.submit.request_digest).
A plain unique index on (account, idempotency_key): tasks without a key hold NULL there,
and NULLs never conflict on either database, so no partial index is needed and the
intake's ON CONFLICT (account, idempotency_key) names it without a WHERE.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("idempotency_key", sa.String(255), nullable=True))
    op.add_column("tasks", sa.Column("request_hash", sa.String(64), nullable=True))
    op.create_index(
        "ix_tasks_account_idempotency_key",
        "tasks",
        ["account", "idempotency_key"],
        unique=True,
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_account_idempotency_key", table_name="tasks")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("request_hash")
        batch.drop_column("idempotency_key")
