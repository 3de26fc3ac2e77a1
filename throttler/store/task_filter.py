"""Which of an account's tasks an operation by filter takes (retry, cancel), oldest first.

One filter shape for every bulk operation: the caller's account, some of the statuses
the operation applies to, a task kind, created before a moment. An operation takes at
most a bounded number of the oldest matches per call, their rows locked in the caller's
transaction (FOR UPDATE on PostgreSQL; SQLite writers hold the database from BEGIN
IMMEDIATE), and says how many still match, so a client calls again until none do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Connection, Row, func, select

from throttler.statuses import TaskStatus
from throttler.store.attempts import TASKS
from throttler.store.intake import LABELS

# Ids per statement, well under SQLite's and asyncpg's bound-parameter limits.
CHUNK = 1000


def chunks(ids: Sequence[str]) -> list[list[str]]:
    """``ids`` in lists of at most ``CHUNK``."""
    return [list(ids[start : start + CHUNK]) for start in range(0, len(ids), CHUNK)]


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskFilter:
    """The account's tasks in ``statuses``, of ``name``, carrying ``label``, created before
    ``created_before``.

    A subclass names the statuses its operation applies to (``applies_to``); a filter
    asking for any other is a ValueError (the API refuses it first, naming the field).
    """

    applies_to: ClassVar[frozenset[TaskStatus]] = frozenset()
    operation: ClassVar[str] = ""

    account: str
    statuses: frozenset[TaskStatus]
    name: str | None = None
    label: str | None = None
    created_before: datetime | None = None

    def __post_init__(self) -> None:
        if not self.statuses or not self.statuses <= self.applies_to:
            allowed = " or ".join(sorted(self.applies_to))
            raise ValueError(f"only {allowed} tasks are {self.operation}: {self.statuses}")

    def where(self) -> list[ColumnElement[bool]]:
        clauses = [
            TASKS.c.account == self.account,
            TASKS.c.status.in_(sorted(status.value for status in self.statuses)),
        ]
        if self.name is not None:
            clauses.append(TASKS.c.name == self.name)
        if self.created_before is not None:
            clauses.append(TASKS.c.created_at < self.created_before)
        if self.label is not None:
            # The label's tasks from its index (account, label, ...), as a list page reads them.
            labelled = select(LABELS.c.task_id).where(
                LABELS.c.account == self.account, LABELS.c.label == self.label
            )
            clauses.append(TASKS.c.id.in_(labelled))
        return clauses


def lock_oldest(
    connection: Connection,
    where: Sequence[ColumnElement[bool]],
    *,
    limit: int,
    columns: Sequence[Any] = (TASKS.c.id,),
) -> Sequence[Row[Any]]:
    """Lock and return ``columns`` of the oldest ``limit`` tasks matching ``where``."""
    return connection.execute(
        select(*columns)
        .where(*where)
        .order_by(TASKS.c.created_at, TASKS.c.id)
        .limit(limit)
        .with_for_update()
    ).all()


def count_matching(connection: Connection, where: Sequence[ColumnElement[bool]]) -> int:
    """How many tasks match ``where`` now (what a next call would take)."""
    total = connection.execute(select(func.count()).select_from(TASKS).where(*where))
    return int(total.scalar_one())
