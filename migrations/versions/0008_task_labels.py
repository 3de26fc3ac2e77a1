"""Task labels: ``tasks.labels`` for the view, ``task_labels`` rows for filtering

A task's labels (the API's ``key``, ``throttler.labels``) are stored twice, both written
in the submission's transaction: as a JSON array on the task itself, so that every view
reads them without a join, and one ``task_labels`` row per label, whose index
(account, label, created_at, task_id) makes "the account's tasks with label K, newest
first" a keyset range, as migration 0005's indexes do for status and name. A task
without labels has NULL in ``tasks.labels`` and no rows, so its submission writes
nothing more than before. Existing tasks have no labels: nothing to backfill.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types: a migration must not change when the models do.
LABELS_DOCUMENT = sa.JSON(none_as_null=True).with_variant(
    postgresql.JSONB(none_as_null=True), "postgresql"
)
TIMESTAMP = sa.DateTime(timezone=True)
LABEL_LENGTH = 161  # a 32-character prefix, a colon, a 128-character value
ACCOUNT_LENGTH = 128
TASK_ID_LENGTH = 36
INDEX = "ix_task_labels_account_label_created_at_task_id"


def upgrade() -> None:
    op.add_column(
        "tasks",
        sa.Column(
            "labels",
            LABELS_DOCUMENT,
            nullable=True,
            comment="The task's labels (the API's key), sorted, for its view without a join; "
            "NULL when it has none. task_labels holds them again, one row each, for filtering.",
        ),
    )
    op.create_table(
        "task_labels",
        sa.Column(
            "task_id",
            sa.String(TASK_ID_LENGTH),
            sa.ForeignKey(
                "tasks.id", name=op.f("fk_task_labels_task_id_tasks"), ondelete="CASCADE"
            ),
            nullable=False,
            comment="The labelled task.",
        ),
        sa.Column(
            "label", sa.String(LABEL_LENGTH), nullable=False, comment="prefix:value, as submitted."
        ),
        sa.Column(
            "account",
            sa.String(ACCOUNT_LENGTH),
            nullable=False,
            comment="The task's account (a copy of tasks.account).",
        ),
        sa.Column(
            "created_at",
            TIMESTAMP,
            nullable=False,
            comment="The task's creation time (a copy of tasks.created_at).",
        ),
        sa.PrimaryKeyConstraint("task_id", "label", name=op.f("pk_task_labels")),
        comment="One row per label of a task (at most 4), written in its submission's "
        "transaction; none for a task without labels.",
    )
    op.create_index(INDEX, "task_labels", ["account", "label", "created_at", "task_id"])


def downgrade() -> None:
    op.drop_index(INDEX, table_name="task_labels")
    op.drop_table("task_labels")
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("labels")
