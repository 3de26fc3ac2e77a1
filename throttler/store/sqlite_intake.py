"""SQLite's intake: each batch on a thread of its own, one multi-row INSERT per table.

Two things pay here (bench.intake): the transaction runs on a dedicated thread with its
own ``sqlite3`` connection (``throttler.store.sqlite_thread``: one hop per batch instead
of one per statement through aiosqlite), and each table's rows go in as one multi-row
``INSERT ... VALUES (...), (...)`` run on the driver directly. Measured per batch of 1
to 500 single-task submissions (this machine, 2 cores): SQLAlchemy's own executemany
(insertmanyvalues on a sync engine) cost 1.3 to 3x as much; compiling
``insert(table).values(rows)`` per row count costs 10 ms for 100 rows and 100 ms for 500
(too dear even cached, for a count that differs each batch); one fixed statement per
table fed a JSON array through ``json_each`` cost about 1.5x at 100 rows (SQLite parses
each element once per column); ``executemany`` on the driver releases and retakes the GIL
around every row, and under load retaking it waits for the event loop.

The statement is built from the table's metadata (names quoted by the dialect's own
identifier preparer, placeholders in its paramstyle), and the values are those
SQLAlchemy itself binds (its column types' bind processors: UTC timestamps as text, JSON
as text), converted on the event loop when a request arrives (``prepare``), so the writer
thread needs the GIL only briefly. The stored rows are the reference's: checked in
tests/integration/store/test_intake_parity.py.

Labels as the reference has them: ``tasks.labels`` is one more column of the tasks
INSERT, and ``task_labels`` a fourth INSERT run only for a batch that has labels.

Idempotency keys as the reference has them (``throttler.store.intake``): the tasks
INSERT ends ``ON CONFLICT (account, idempotency_key) DO NOTHING``; only a batch with
keys reads them back, and then only the inserted tasks' outbox and event rows go in.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import Column, Table
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.models import UTCDateTime
from throttler.settings import Settings
from throttler.store.intake import (
    BOUND_COLUMNS,
    EVENTS,
    IDEMPOTENCY_INDEX,
    LABELS,
    MAX_ROWS_PER_STATEMENT,
    OUTBOX,
    TASKS,
    Bound,
    CoreIntake,
    KeyHolder,
    Outcome,
    Submission,
    event_row,
    keyed_pairs,
    label_rows,
    outbox_row,
    resolve_keys,
    task_row,
)
from throttler.store.reads import task_view
from throttler.store.sqlite_thread import SQLiteThread
from throttler.submit import NewTask

Processor = Callable[[Any], Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class _Insert:
    """One table's multi-row INSERT, with the column types' own bind processors."""

    head: str  # INSERT INTO table (columns) VALUES
    marks: str  # (?, ?, ...): one row's placeholders
    tail: str  # after the rows: the tasks' ON CONFLICT clause, else nothing
    row: Callable[[NewTask], dict[str, Any]]
    keys: tuple[str, ...]
    processors: tuple[Processor | None, ...]

    @classmethod
    def of(
        cls, table: Table, row: Callable[[NewTask], dict[str, Any]], *, tail: str = ""
    ) -> _Insert:
        dialect = sqlite_dialect(paramstyle="qmark")
        quote = dialect.identifier_preparer
        # With a label, so that ``_first_label_row`` gives the task_labels columns too.
        sample = NewTask(
            name="", account="", payload={}, created_at=datetime.now(UTC), labels=("a:b",)
        )
        keys = tuple(row(sample))
        types = {column.key: column.type for column in table.columns}
        columns = ", ".join(quote.format_column(table.c[key]) for key in keys)
        return cls(
            # Only names from the table's own metadata, quoted by the dialect, go in.
            head=f"INSERT INTO {quote.format_table(table)} ({columns}) VALUES ",  # noqa: S608
            marks="(" + ", ".join("?" * len(keys)) + ")",
            tail=tail,
            row=row,
            keys=keys,
            processors=tuple(_processor(types[key], dialect) for key in keys),
        )

    def parameters(self, tasks: Sequence[NewTask]) -> list[Any]:
        """The tasks' rows' values, converted, in placeholder order, one row after another."""
        return self.values(map(self.row, tasks))

    def values(self, rows: Iterable[dict[str, Any]]) -> list[Any]:
        """``rows``' values, converted, in placeholder order, one row after another."""
        pairs = tuple(zip(self.keys, self.processors, strict=True))
        return [
            row[key] if process is None else process(row[key])
            for row in rows
            for key, process in pairs
        ]

    def execute(self, connection: sqlite3.Connection, parameters: Sequence[Any]) -> None:
        width = len(self.keys)
        limit = connection.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width
        per_statement = max(1, min(limit, MAX_ROWS_PER_STATEMENT)) * width
        for start in range(0, len(parameters), per_statement):
            chunk = parameters[start : start + per_statement]
            marks = ", ".join([self.marks] * (len(chunk) // width))
            connection.execute(self.head + marks + self.tail, chunk)

    def only(self, parameters: Sequence[Any], keep: Sequence[bool]) -> list[Any]:
        """The rows of ``parameters`` (one per task) whose ``keep`` is true."""
        width = len(self.keys)
        return [
            value
            for index, kept in enumerate(keep)
            if kept
            for value in parameters[index * width : (index + 1) * width]
        ]

    def of_tasks(self, parameters: Sequence[Any], task_ids: set[str]) -> list[Any]:
        """The rows of ``parameters`` (any number per task) whose task is in ``task_ids``."""
        width = len(self.keys)
        at = self.keys.index("task_id")
        return [
            value
            for start in range(0, len(parameters), width)
            if parameters[start + at] in task_ids
            for value in parameters[start : start + width]
        ]


def _processor(column_type: Any, dialect: Any) -> Processor | None:
    process: Processor | None = column_type.dialect_impl(dialect).bind_processor(dialect)
    if process is not None and isinstance(column_type, UTCDateTime):
        # A task's created_at is written three times, and a bulk request's tasks share
        # one: each distinct moment is converted once.
        return lru_cache(maxsize=1024)(process)
    return process


@dataclass(frozen=True, kw_only=True, slots=True)
class _Rows:
    """One submission's values per table, in placeholder order."""

    tasks: list[Any]
    outbox: list[Any]
    events: list[Any]
    labels: list[Any]  # empty for tasks without labels


@dataclass(frozen=True, kw_only=True, slots=True)
class _Inserts:
    tasks: _Insert
    outbox: _Insert
    events: _Insert
    labels: _Insert


def _first_label_row(task: NewTask) -> dict[str, Any]:
    # Only to name task_labels' columns (_Insert.of): a task may have 0 to 4 rows.
    return label_rows(task)[0]


_quote = sqlite_dialect().identifier_preparer.quote
_ON_KEY_TAKEN = f" ON CONFLICT ({', '.join(map(_quote, IDEMPOTENCY_INDEX))}) DO NOTHING"


@dataclass(frozen=True, kw_only=True, slots=True)
class _BoundSelect:
    """The keys' read-back (the reference's ``BOUND_COLUMNS``), with the column types' own
    result processors, so a replay's view is the one the read store would give."""

    sql: str  # {} stands for the (account, key) pairs' VALUES rows
    row: Callable[..., Any]  # a named row, as task_view reads it
    processors: tuple[Processor | None, ...]

    @classmethod
    def of(cls) -> _BoundSelect:
        dialect = sqlite_dialect()
        quote = dialect.identifier_preparer
        columns = [cast(Column[Any], column.expression) for column in BOUND_COLUMNS]
        names = ", ".join(quote.format_column(column) for column in columns)
        return cls(
            # Only names from the table's own metadata, quoted by the dialect, go in.
            # The pairs as the outer loop, each a look-up in the unique index: SQLite plans
            # ``(account, idempotency_key) IN (VALUES ...)`` as a scan of every task (the
            # replay bench fell to a third of a plain submit on a table of 100,000 tasks).
            sql=f"SELECT {names} FROM (VALUES {{}}) AS pair"  # noqa: S608
            f" CROSS JOIN {quote.format_table(TASKS)}"
            f" ON {quote.format_column(TASKS.c.account)} = pair.column1"
            f" AND {quote.format_column(TASKS.c.idempotency_key)} = pair.column2",
            row=namedtuple("BoundRow", [column.key for column in columns]),
            processors=tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, None)
                for column in columns
            ),
        )

    def bound(self, connection: sqlite3.Connection, pairs: Sequence[tuple[str, str]]) -> Bound:
        bound: Bound = {}
        for start in range(0, len(pairs), MAX_ROWS_PER_STATEMENT):
            chunk = pairs[start : start + MAX_ROWS_PER_STATEMENT]
            query = self.sql.format(", ".join(["(?, ?)"] * len(chunk)))
            values = [value for pair in chunk for value in pair]
            for raw in connection.execute(query, values):
                row = self.row(
                    *(
                        value if process is None else process(value)
                        for value, process in zip(raw, self.processors, strict=True)
                    )
                )
                bound[(row.account, row.idempotency_key)] = KeyHolder(
                    request_hash=row.request_hash, view=task_view(row)
                )
        return bound


@lru_cache(maxsize=1)
def _bound_select() -> _BoundSelect:
    return _BoundSelect.of()


@lru_cache(maxsize=1)
def _inserts() -> _Inserts:
    return _Inserts(
        tasks=_Insert.of(TASKS, task_row, tail=_ON_KEY_TAKEN),
        outbox=_Insert.of(OUTBOX, outbox_row),
        events=_Insert.of(EVENTS, event_row),
        labels=_Insert.of(LABELS, _first_label_row),
    )


class SQLiteIntake(CoreIntake):
    """The reference's rows, written on a thread of the intake's own."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        *,
        connect: Callable[[], sqlite3.Connection] | None = None,
    ) -> None:
        super().__init__(engine)
        self._thread = SQLiteThread(settings, name="intake-writer", connect=connect)

    @property
    def batches_in_flight(self) -> int:
        # The next batch waits on the thread's queue while one runs, taking submissions
        # until the thread starts it (throttler.group_commit): the thread goes straight
        # on to it, as the API's own writer thread did before the committer was shared.
        return 2

    def prepare(self, tasks: Sequence[NewTask]) -> Submission:
        inserts = _inserts()
        rows = _Rows(
            tasks=inserts.tasks.parameters(tasks),
            outbox=inserts.outbox.parameters(tasks),
            events=inserts.events.parameters(tasks),
            labels=inserts.labels.values(
                row for task in tasks if task.labels for row in label_rows(task)
            )
            if any(task.labels for task in tasks)
            else [],
        )
        return Submission(tasks=tasks, rows=rows)

    async def insert(self, take: Callable[[], Sequence[Submission]]) -> list[Outcome]:
        def insert_batch(connection: sqlite3.Connection) -> list[Outcome]:
            # Taken here, on the thread as its transaction begins: the committer's batch
            # takes every submission that arrived while the last transaction ran.
            submissions = take()
            rows = [_rows_of(self, submission) for submission in submissions]
            return _insert_rows(connection, [submission.tasks for submission in submissions], rows)

        return await self._thread.transaction(insert_batch)

    async def close(self) -> None:
        await self._thread.close()


def _rows_of(intake: SQLiteIntake, submission: Submission) -> _Rows:
    rows = submission.rows
    if not isinstance(rows, _Rows):  # prepared by another intake: convert here
        rows = intake.prepare(submission.tasks).rows
    assert isinstance(rows, _Rows)
    return rows


def _insert_rows(
    connection: sqlite3.Connection,
    submissions: Sequence[Sequence[NewTask]],
    batch: Sequence[_Rows],
) -> list[Outcome]:
    inserts = _inserts()
    inserts.tasks.execute(connection, [value for rows in batch for value in rows.tasks])
    outbox = [value for rows in batch for value in rows.outbox]
    events = [value for rows in batch for value in rows.events]
    labels = [value for rows in batch for value in rows.labels]
    tasks = [task for submission in submissions for task in submission]
    pairs = keyed_pairs(tasks)
    if not pairs:
        outcomes: list[Outcome] = [[None] * len(submission) for submission in submissions]
    else:
        outcomes, _ = resolve_keys(submissions, _bound_select().bound(connection, pairs))
        keep = [existing is None for outcome in outcomes for existing in outcome]
        outbox = inserts.outbox.only(outbox, keep)
        events = inserts.events.only(events, keep)
        if labels:
            inserted = {task.task_id for task, kept in zip(tasks, keep, strict=True) if kept}
            labels = inserts.labels.of_tasks(labels, inserted)
    inserts.outbox.execute(connection, outbox)
    inserts.events.execute(connection, events)
    if labels:  # no statement at all for a batch without labels
        inserts.labels.execute(connection, labels)
    return outcomes
