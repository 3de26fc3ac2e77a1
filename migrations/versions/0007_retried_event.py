"""Explicit retries: the ``retried`` event, and the attempt count a retry restarts tries at

``task_events.event``'s CHECK constraint gains ``retried`` (SQLite cannot alter a CHECK
in place: batch mode copies the table with the new constraint). ``tasks.tries_base`` is
the task's ``attempts`` when it was last explicitly retried: ``attempts`` keeps counting
every attempt, and a worker counts only those after the retry against the task's tries.

The downgrade refuses while any ``retried`` event exists: those rows are audit history,
and neither deleting them nor rewriting them as another event may happen unasked. Delete
them yourself (``DELETE FROM task_events WHERE event = 'retried'``) to go back.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies: a migration must not change when the models do.
EVENTS_BEFORE = (
    "'submitted', 'queued', 'started', 'retrying', 'succeeded', 'failed', 'cancelled', "
    "'requeued'"
)
EVENTS_AFTER = f"{EVENTS_BEFORE}, 'retried'"
CHECK = "ck_task_events_event"


def _replace_event_check(events: str) -> None:
    with op.batch_alter_table("task_events") as batch:
        batch.drop_constraint(op.f(CHECK), type_="check")
        batch.create_check_constraint(op.f(CHECK), f"event IN ({events})")


def upgrade() -> None:
    _replace_event_check(EVENTS_AFTER)
    op.add_column(
        "tasks", sa.Column("tries_base", sa.Integer(), nullable=False, server_default="0")
    )


def downgrade() -> None:
    retried = op.get_bind().execute(
        sa.text("SELECT count(*) FROM task_events WHERE event = 'retried'")
    ).scalar_one()
    if retried:
        raise RuntimeError(
            f"downgrade below 0006 refused: {retried} task_events rows are 'retried' events "
            "(audit history); delete them explicitly to downgrade"
        )
    op.drop_column("tasks", "tries_base")
    _replace_event_check(EVENTS_BEFORE)
