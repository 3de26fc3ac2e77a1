"""Accept tasks durably: a task row, its outbox row and its ``submitted`` event each.

Repository functions take a session inside the caller's transaction and never commit.
"""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import Table, bindparam, insert, text
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.types import TypeEngine

from throttler.constants import DEFAULT_PRIORITY
from throttler.db import run_on_sqlite
from throttler.models import OutboxEntry, Task, TaskEvent, UTCDateTime
from throttler.statuses import EventKind, TaskStatus

# RFC 9562 version 7: 48 bits of Unix time in milliseconds, then 74 random bits (the
# other 6 name the version and variant).
_UUID7_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_UUID7_MARKS = (0x7 << 76) | (0x2 << 62)


def new_task_id() -> str:
    """A new task id: a UUID (version 7) that sorts by creation time.

    Time-ordered ids land at the right edge of every index keyed by task id (tasks,
    outbox, task_events) instead of on a random page each: on SQLite that halves the
    pages a batch dirties and so its insert and commit cost. The 74 random bits need to
    be unique, not secret (a task is only ever read within its own account), so they come
    from ``random`` (reseeded in forked children), not ``os.urandom``: a system call per
    id, which lets the intake writer's thread take the GIL mid-request.
    """
    value = (time.time_ns() // 1_000_000) << 80 | random.getrandbits(80)
    return str(uuid.UUID(int=value & _UUID7_CLEAR | _UUID7_MARKS))


@dataclass(frozen=True, kw_only=True, slots=True)
class NewTask:
    """A validated submission, ready to insert: ``submit_tasks`` writes many in one go."""

    name: str
    account: str
    payload: Mapping[str, Any]
    created_at: datetime
    priority: int = DEFAULT_PRIORITY
    host: str | None = None
    run_at: datetime | None = None
    task_id: str = field(default_factory=new_task_id)


async def submit_task(
    session: AsyncSession,
    *,
    name: str,
    account: str,
    payload: Mapping[str, Any],
    now: datetime,
    priority: int = DEFAULT_PRIORITY,
    host: str | None = None,
    run_at: datetime | None = None,
    task_id: str | None = None,
) -> Task:
    """Insert a pending task, its outbox row and its ``submitted`` event.

    Returns the task as a detached object (not in the session).
    """
    task = NewTask(
        name=name,
        account=account,
        payload=dict(payload),
        created_at=now,
        priority=priority,
        host=host,
        run_at=run_at,
        task_id=task_id or new_task_id(),
    )
    await submit_tasks(session, [task])
    return Task(
        id=task.task_id,
        name=name,
        account=account,
        payload=dict(payload),
        status=TaskStatus.PENDING,
        priority=priority,
        host=host,
        run_at=run_at,
        attempts=0,
        created_at=now,
    )


async def submit_tasks(session: AsyncSession, tasks: Sequence[NewTask]) -> None:
    """Insert pending tasks with their outbox rows and ``submitted`` events.

    One statement per table however many tasks, on the Core tables: neither ORM objects
    nor the ORM's bulk path, which cost more than the inserts. On SQLite all three run in
    one call on the driver's thread. The caller's transaction makes them all visible at
    once or not at all.
    """
    if not tasks:
        return
    dialect = session.get_bind().dialect.name
    if dialect == "sqlite":
        await run_on_sqlite(session, lambda connection: insert_tasks_sqlite(connection, tasks))
        return
    if dialect == "postgresql":
        # One statement, so one round trip: each is a wait behind the busy event loop.
        await session.execute(_POSTGRES_SUBMIT, _postgres_parameters(tasks))
        return
    await session.execute(insert(_TASKS), [_task_row(task) for task in tasks])
    await session.execute(insert(_OUTBOX), [_outbox_row(task) for task in tasks])
    await session.execute(insert(_EVENTS), [_event_row(task) for task in tasks])


# The three inserts as one statement, fed by arrays. Data-modifying CTEs all run, and
# the foreign keys are checked at the end of the statement, so the outbox and event rows
# may come from the same arrays rather than from tasks' RETURNING (whose order is not
# defined): ORDER BY keeps the outbox ids in submission order, as three inserts would.
_POSTGRES_SUBMIT = text(
    """
    WITH submitted AS (
        SELECT * FROM unnest(
            CAST(:ids AS varchar[]), CAST(:names AS varchar[]), CAST(:accounts AS varchar[]),
            CAST(:payloads AS text[]), CAST(:hosts AS varchar[]),
            CAST(:priorities AS smallint[]), CAST(:created AS timestamptz[]),
            CAST(:run_at AS timestamptz[])
        ) WITH ORDINALITY
        AS s(id, name, account, payload, host, priority, created_at, run_at, n)
    ), new_tasks AS (
        INSERT INTO tasks
            (id, name, account, payload, host, status, priority, attempts, created_at, run_at)
        SELECT id, name, account, CAST(payload AS jsonb), host, :pending, priority, 0,
            created_at, run_at
        FROM submitted ORDER BY n
    ), new_outbox AS (
        INSERT INTO outbox (task_id, created_at)
        SELECT id, created_at FROM submitted ORDER BY n
    )
    INSERT INTO task_events (task_id, at, event, detail)
    SELECT id, created_at, :event, jsonb_build_object('account', account)
    FROM submitted ORDER BY n
    """
)


def _postgres_parameters(tasks: Sequence[NewTask]) -> dict[str, Any]:
    return {
        "ids": [task.task_id for task in tasks],
        "names": [task.name for task in tasks],
        "accounts": [task.account for task in tasks],
        "payloads": [json.dumps(dict(task.payload)) for task in tasks],
        "hosts": [task.host for task in tasks],
        "priorities": [task.priority for task in tasks],
        "created": [task.created_at for task in tasks],
        "run_at": [task.run_at for task in tasks],
        "pending": TaskStatus.PENDING.value,
        "event": EventKind.SUBMITTED.value,
    }


_TASKS = cast(Table, Task.__table__)
_OUTBOX = cast(Table, OutboxEntry.__table__)
_EVENTS = cast(Table, TaskEvent.__table__)


def _task_row(task: NewTask) -> dict[str, Any]:
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


def _outbox_row(task: NewTask) -> dict[str, Any]:
    return {"task_id": task.task_id, "created_at": task.created_at}


def _event_row(task: NewTask) -> dict[str, Any]:
    return {
        "task_id": task.task_id,
        "at": task.created_at,
        "event": EventKind.SUBMITTED.value,
        "detail": {"account": task.account},
    }


Processor = Callable[[Any], Any]
# Rows per INSERT statement at most; the connection's limit on parameters may lower it.
_MAX_ROWS_PER_STATEMENT = 1000


@dataclass(frozen=True, kw_only=True, slots=True)
class _Insert:
    """One table's multi-row INSERT, with the column types' own bind processors."""

    head: str  # INSERT INTO table (columns) VALUES
    marks: str  # (?, ?, ...): one row's placeholders
    keys: tuple[str, ...]
    processors: tuple[Processor | None, ...]

    @classmethod
    def of(cls, table: Table, keys: Sequence[str], dialect: Dialect) -> _Insert:
        compiled = (
            insert(table).values({key: bindparam(key) for key in keys}).compile(dialect=dialect)
        )
        head, marks = str(compiled).split(" VALUES ")
        order = tuple(compiled.positiontup or ())  # SQLite's parameters are positional
        types = {column.key: column.type for column in table.columns}
        return cls(
            head=f"{head} VALUES ",
            marks=marks,
            keys=order,
            # SQLAlchemy's own conversions (UTC timestamps as text, JSON as text), so the
            # rows are exactly what session.execute(insert(...)) would have written.
            processors=tuple(_processor(types[key], dialect) for key in order),
        )

    def parameters(self, rows: Sequence[dict[str, Any]]) -> list[Any]:
        """The rows' values, converted, in placeholder order, one row after another."""
        pairs = tuple(zip(self.keys, self.processors, strict=True))
        return [
            row[key] if process is None else process(row[key])
            for row in rows
            for key, process in pairs
        ]

    def execute(self, connection: sqlite3.Connection, parameters: Sequence[Any]) -> None:
        # Many rows per statement rather than executemany: sqlite3 releases and retakes
        # the GIL around every step, and under load retaking it waits for the event loop.
        width = len(self.keys)
        limit = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
        per_statement = max(1, min(limit, _MAX_ROWS_PER_STATEMENT)) * width
        for start in range(0, len(parameters), per_statement):
            chunk = parameters[start : start + per_statement]
            sql = self.head + ", ".join([self.marks] * (len(chunk) // width))
            try:
                connection.execute(sql, chunk)
            except sqlite3.Error as error:
                # The exception SQLAlchemy raises for it (IntegrityError, or an
                # OperationalError the API answers with 503), not the driver's own.
                raise DBAPIError.instance(sql, None, error, sqlite3.Error) from error


def _processor(column_type: TypeEngine[Any], dialect: Dialect) -> Processor | None:
    process: Processor | None = column_type.dialect_impl(dialect).bind_processor(dialect)
    if process is not None and isinstance(column_type, UTCDateTime):
        # A task's created_at is written three times, and a bulk request's tasks share
        # one: each distinct moment is converted once.
        return lru_cache(maxsize=1024)(process)
    return process


@dataclass(frozen=True, kw_only=True, slots=True)
class _SQLiteInserts:
    tasks: _Insert
    outbox: _Insert
    events: _Insert


@lru_cache(maxsize=1)
def _sqlite_inserts() -> _SQLiteInserts:
    dialect = sqlite_dialect()
    sample = NewTask(name="", account="", payload={}, created_at=datetime.min, task_id="")
    return _SQLiteInserts(
        tasks=_Insert.of(_TASKS, list(_task_row(sample)), dialect),
        outbox=_Insert.of(_OUTBOX, list(_outbox_row(sample)), dialect),
        events=_Insert.of(_EVENTS, list(_event_row(sample)), dialect),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class SQLiteRows:
    """Tasks converted for SQLite's three inserts, ready for ``insert_rows_sqlite``.

    Converting costs CPU under the GIL; the API does it on the event loop as a request
    arrives, so that its writer thread, holding the connection, only executes.
    """

    tasks: list[Any]
    outbox: list[Any]
    events: list[Any]

    @classmethod
    def of(cls, tasks: Sequence[NewTask]) -> SQLiteRows:
        inserts = _sqlite_inserts()
        return cls(
            tasks=inserts.tasks.parameters([_task_row(task) for task in tasks]),
            outbox=inserts.outbox.parameters([_outbox_row(task) for task in tasks]),
            events=inserts.events.parameters([_event_row(task) for task in tasks]),
        )


def insert_rows_sqlite(connection: sqlite3.Connection, batch: Sequence[SQLiteRows]) -> None:
    """Insert prepared submissions on a plain sqlite3 connection, in its transaction."""
    inserts = _sqlite_inserts()
    inserts.tasks.execute(connection, [value for rows in batch for value in rows.tasks])
    inserts.outbox.execute(connection, [value for rows in batch for value in rows.outbox])
    inserts.events.execute(connection, [value for rows in batch for value in rows.events])


def insert_tasks_sqlite(connection: sqlite3.Connection, tasks: Sequence[NewTask]) -> None:
    """``submit_tasks`` on a plain sqlite3 connection, in its current transaction."""
    insert_rows_sqlite(connection, [SQLiteRows.of(tasks)])
