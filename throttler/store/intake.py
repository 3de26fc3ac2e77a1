"""Insert submissions: a task row, its outbox row and its ``submitted`` event per new task.

``Intake`` is the seam; ``CoreIntake`` the reference in portable SQLAlchemy Core (one
multi-row INSERT per table); ``open_intake`` returns it or a dialect's fast path
(``throttler.store.sqlite_intake``, ``throttler.store.postgres_intake``), each checked
against it row by row in tests/integration/store/test_intake_parity.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from sqlalchemy import Table, insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.submit import NewTask

TASKS = cast(Table, Task.__table__)
OUTBOX = cast(Table, OutboxEntry.__table__)
EVENTS = cast(Table, TaskEvent.__table__)

# Rows per INSERT statement at most: well within every driver's limit on parameters
# (32,767 for asyncpg, 32,766 for SQLite) at ten columns a row.
MAX_ROWS_PER_STATEMENT = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class Submission:
    """One request's tasks, written together or not at all.

    ``rows`` is an implementation's own form of them, made by ``Intake.prepare`` when the
    request arrives (on the event loop), so that the batch's transaction only executes.
    """

    tasks: Sequence[NewTask]
    rows: object = None


class Intake(Protocol):
    """Where accepted tasks are written."""

    # How many batches a writer may hand to ``insert`` before the first has committed:
    # more than one where they queue for one thread of the intake's own (SQLite).
    @property
    def batches_in_flight(self) -> int: ...

    def prepare(self, tasks: Sequence[NewTask]) -> Submission:
        """Ready ``tasks`` for ``insert`` (conversions that need no database)."""
        ...

    async def insert(self, take: Callable[[], Sequence[Submission]]) -> None:
        """Write the submissions ``take()`` returns in ONE transaction; return once committed.

        ``take`` is called once, as the transaction begins (on whatever thread runs it):
        a group committer's batch may grow until then. Raises SQLAlchemy's exception for
        a failed transaction (nothing of it written).
        """
        ...

    async def close(self) -> None:
        """Release what the intake opened itself (not the engine)."""
        ...


def task_row(task: NewTask) -> dict[str, Any]:
    return {
        "id": task.task_id,
        "name": task.name,
        "account": task.account,
        "payload": dict(task.payload),
        "host": task.host,
        "status": TaskStatus.PENDING.value,
        "priority": task.priority,
        "attempts": 0,
        "created_at": task.created_at,
        "run_at": task.run_at,
    }


def outbox_row(task: NewTask) -> dict[str, Any]:
    return {"task_id": task.task_id, "created_at": task.created_at}


def event_row(task: NewTask) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "at": task.created_at,
        "event": EventKind.SUBMITTED.value,
        "detail": {"account": task.account},
    }


async def insert_submissions(
    executor: AsyncConnection | AsyncSession, tasks: Sequence[NewTask]
) -> None:
    """The reference: insert ``tasks`` in the caller's transaction, one multi-row INSERT
    per table (per ``MAX_ROWS_PER_STATEMENT`` rows), outbox ids in submission order."""
    for table, row in ((TASKS, task_row), (OUTBOX, outbox_row), (EVENTS, event_row)):
        for start in range(0, len(tasks), MAX_ROWS_PER_STATEMENT):
            chunk = tasks[start : start + MAX_ROWS_PER_STATEMENT]
            await executor.execute(insert(table).values([row(task) for task in chunk]))


class CoreIntake:
    """The reference intake: each batch a transaction on a connection of ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    @property
    def batches_in_flight(self) -> int:
        # One at a time: a second would take a second connection and commit out of order.
        return 1

    def prepare(self, tasks: Sequence[NewTask]) -> Submission:
        return Submission(tasks=tasks)

    async def insert(self, take: Callable[[], Sequence[Submission]]) -> None:
        tasks = [task for submission in take() for task in submission.tasks]
        if not tasks:
            return
        async with self._engine.begin() as connection:
            await self.insert_in(connection, tasks)

    async def insert_in(self, connection: AsyncConnection, tasks: Sequence[NewTask]) -> None:
        """Insert ``tasks`` in ``connection``'s transaction (overridden by fast paths)."""
        await insert_submissions(connection, tasks)

    async def close(self) -> None:
        """Nothing of its own: the engine belongs to the caller."""


def open_intake(settings: Settings, engine: AsyncEngine) -> Intake:
    """The intake for ``DATABASE_URL``: its dialect's fast path where one pays."""
    if settings.is_sqlite:
        from throttler.store.sqlite_intake import SQLiteIntake

        return SQLiteIntake(settings, engine)
    if engine.dialect.name == "postgresql":
        from throttler.store.postgres_intake import PostgresIntake

        return PostgresIntake(engine)
    return CoreIntake(engine)
