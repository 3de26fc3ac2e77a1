"""SQLite's attempts: the reference's transaction, on a thread of its own, on plain sqlite3.

Through SQLAlchemy a batch of ten writes cost about three times the CPU of the same
statements on the driver (statement set-up, bind processing, result wrapping), and on a
worker that CPU is taken from ARQ's own loop; through aiosqlite each statement is also a
round trip to the driver's thread. So here the whole batch runs on a dedicated thread
(``throttler.store.sqlite_thread``) with its own connection, one hop per batch.

The statements are SQLAlchemy Core, compiled once for SQLite; the ids of a batch go in as
one JSON array (``json_each``), so each statement's SQL is fixed whatever the batch size.
Every value is converted by SQLAlchemy's own type processors (bind processors for what
is written, the JSON result processor for what is read back), so the rows are the
reference's: checked in tests/integration/store/test_attempts_parity.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from throttler.job_ids import Dispatch
from throttler.models import UTCDateTime
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import (
    EVENTS,
    OUTBOX,
    TASKS,
    Attempt,
    AttemptWrites,
    CoreAttempts,
    DispatchedRow,
    Outcome,
    check_unique,
    current_on,
    in_start_order,
    outcome_event,
    plan_starts,
    running_attempts,
    started_event,
)
from throttler.store.sqlite_thread import SQLiteThread

Processor = Callable[[Any], Any]
_DIALECT = sqlite_dialect(paramstyle="qmark")


@dataclass(frozen=True, kw_only=True, slots=True)
class _Statement:
    """A Core statement compiled for SQLite: its SQL, and how to bind a row of values."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Processor | None, ...]
    # The statement's own values (constants in it), already converted.
    constants: dict[str, Any]

    @classmethod
    def of(cls, statement: ClauseElement) -> _Statement:
        # render_postcompile: the constant lists (the terminal statuses) as plain
        # placeholders, so the SQL is fixed; every other value is a named bindparam.
        compiled = statement.compile(dialect=_DIALECT, compile_kwargs={"render_postcompile": True})
        assert isinstance(compiled, SQLCompiler)
        names = tuple(compiled.positiontup or ())
        binds = compiled.binds
        processors: list[Processor | None] = []
        for name in names:
            # An expanded list's placeholders (status_1_1, ...) share their list's type.
            bind = binds[name] if name in binds else binds[name.rsplit("_", 1)[0]]
            processors.append(_processor(bind.type))
        constants = {
            name: value if process is None else process(value)
            for name, process in zip(names, processors, strict=True)
            if (value := compiled.params.get(name)) is not None
        }
        return cls(
            sql=compiled.string,
            names=names,
            processors=tuple(processors),
            constants=constants,
        )

    def bind(self, values: Mapping[str, Any]) -> list[Any]:
        """The positional parameters for ``values`` (converted) and the constants."""
        return [
            (value if process is None else process(value))
            if (value := values.get(name, _MISSING)) is not _MISSING
            else self.constants.get(name)
            for name, process in zip(self.names, self.processors, strict=True)
        ]


_MISSING = object()


def _processor(column_type: Any) -> Processor | None:
    process: Processor | None = column_type.dialect_impl(_DIALECT).bind_processor(_DIALECT)
    if process is not None and isinstance(column_type, UTCDateTime):
        # A batch's starts share one moment, and its outcomes often do: each distinct
        # moment is converted once.
        return lru_cache(maxsize=256)(process)
    return process


def _ids_in_json(column: Any = TASKS.c.id) -> Any:
    """``column IN (the ids of a JSON array parameter)``: one placeholder for any number."""
    ids = func.json_each(bindparam("task_ids", value=None)).table_valued("value")
    return column.in_(select(ids.c.value))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Statements:
    dispatched: _Statement
    start: _Statement
    live: _Statement
    insert_event: _Statement
    update: dict[EventKind, _Statement]
    delete_outbox: _Statement
    insert_outbox: _Statement
    payload: Processor | None
    queued_at: Processor | None


@lru_cache(maxsize=1)
def _statements() -> _Statements:
    sample = {
        event: Outcome(
            task_id="",
            event=event,
            attempt=1,
            worker_id="",
            now=datetime.now(),
            tries_base=0 if event is EventKind.RETRYING else None,
        )
        for event in (
            EventKind.SUCCEEDED,
            EventKind.FAILED,
            EventKind.RETRYING,
            EventKind.REQUEUED,
        )
    }
    return _Statements(
        dispatched=_Statement.of(
            select(
                TASKS.c.id, TASKS.c.status, TASKS.c.queued_at, TASKS.c.name, TASKS.c.attempts
            ).where(_ids_in_json())
        ),
        start=_Statement.of(
            update(TASKS)
            .where(_ids_in_json())
            .values(
                status=TaskStatus.RUNNING.value,
                attempts=TASKS.c.attempts + 1,
                started_at=bindparam("now", value=None, type_=TASKS.c.started_at.type),
            )
            .returning(
                TASKS.c.id, TASKS.c.name, TASKS.c.payload, TASKS.c.attempts, TASKS.c.tries_base
            )
        ),
        live=_Statement.of(
            select(TASKS.c.id, TASKS.c.status, TASKS.c.attempts).where(_ids_in_json())
        ),
        insert_event=_Statement.of(
            insert(EVENTS).values(
                {
                    column: bindparam(column, value=None, type_=EVENTS.c[column].type)
                    for column in ("task_id", "at", "event", "detail")
                }
            )
        ),
        # One statement per shape of outcome, as Outcome.values() sets them.
        update={
            event: _Statement.of(
                update(TASKS)
                .where(TASKS.c.id == bindparam("task_key", value=None, type_=TASKS.c.id.type))
                .values(
                    {
                        column: bindparam(column, value=None, type_=TASKS.c[column].type)
                        for column in outcome.values()
                    }
                )
            )
            for event, outcome in sample.items()
        },
        delete_outbox=_Statement.of(delete(OUTBOX).where(_ids_in_json(OUTBOX.c.task_id))),
        insert_outbox=_Statement.of(
            insert(OUTBOX).values(
                {
                    column: bindparam(column, value=None, type_=OUTBOX.c[column].type)
                    for column in ("task_id", "created_at")
                }
            )
        ),
        payload=TASKS.c.payload.type.dialect_impl(_DIALECT).result_processor(_DIALECT, None),
        queued_at=TASKS.c.queued_at.type.dialect_impl(_DIALECT).result_processor(_DIALECT, None),
    )


def _start(
    connection: sqlite3.Connection, *, starts: Sequence[Dispatch], worker_id: str, now: datetime
) -> dict[str, Attempt]:
    if not starts:
        return {}
    statements = _statements()
    dispatched, load_at = statements.dispatched, statements.queued_at
    plan = plan_starts(
        starts,
        [
            DispatchedRow(
                task_id=task_id,
                status=status,
                queued_at=at if load_at is None else load_at(at),
                name=name,
                attempts=attempts,
            )
            for task_id, status, at, name, attempts in connection.execute(
                dispatched.sql,
                dispatched.bind({"task_ids": json.dumps([start.task_id for start in starts])}),
            )
        ],
    )
    if not plan.to_start:
        return plan.orphaned
    task_ids = plan.to_start
    start = statements.start
    rows = connection.execute(
        start.sql, start.bind({"task_ids": json.dumps(list(task_ids)), "now": now})
    ).fetchall()
    load = statements.payload
    attempts = in_start_order(
        plan,
        {
            task_id: Attempt(
                task_id=task_id,
                name=name,
                payload=payload if load is None else load(payload),
                attempt=attempt,
                tries_base=base,
            )
            for task_id, name, payload, attempt, base in rows
        },
    )
    if attempts:
        insert_event = statements.insert_event
        connection.executemany(
            insert_event.sql,
            [
                insert_event.bind(started_event(attempt, worker_id=worker_id, now=now))
                for attempt in attempts.values()
            ],
        )
    return {**plan.orphaned, **attempts}


def _record(connection: sqlite3.Connection, outcomes: Sequence[Outcome]) -> set[str]:
    if not outcomes:
        return set()
    check_unique(outcomes)
    statements = _statements()
    live_ids = json.dumps([outcome.task_id for outcome in outcomes])
    running = running_attempts(
        connection.execute(statements.live.sql, statements.live.bind({"task_ids": live_ids}))
    )
    written = current_on(outcomes, running)
    if not written:
        return set()
    by_event: dict[EventKind, list[list[Any]]] = {}
    for outcome in written:
        values = {"task_key": outcome.task_id, **outcome.values()}
        by_event.setdefault(outcome.event, []).append(statements.update[outcome.event].bind(values))
    for event, rows in by_event.items():
        connection.executemany(statements.update[event].sql, rows)
    again = [outcome for outcome in written if outcome.again]
    if again:
        delete_outbox, insert_outbox = statements.delete_outbox, statements.insert_outbox
        connection.execute(
            delete_outbox.sql,
            delete_outbox.bind({"task_ids": json.dumps([outcome.task_id for outcome in again])}),
        )
        connection.executemany(
            insert_outbox.sql, [insert_outbox.bind(outcome.outbox_row()) for outcome in again]
        )
    insert_event = statements.insert_event
    connection.executemany(
        insert_event.sql, [insert_event.bind(outcome_event(outcome)) for outcome in written]
    )
    return {outcome.task_id for outcome in written}


class SQLiteAttempts(CoreAttempts):
    """The reference's transaction, on a thread and ``sqlite3`` connection of its own."""

    def __init__(self, settings: Settings, engine: AsyncEngine) -> None:
        super().__init__(engine)
        self._thread = SQLiteThread(settings, name="status-writer")

    async def write(
        self,
        *,
        starts: Sequence[Dispatch],
        outcomes: Sequence[Outcome],
        worker_id: str,
        now: datetime,
    ) -> AttemptWrites:
        def write_attempts(connection: sqlite3.Connection) -> AttemptWrites:
            started = _start(connection, starts=starts, worker_id=worker_id, now=now)
            return AttemptWrites(started=started, recorded=_record(connection, outcomes))

        return await self._thread.transaction(write_attempts)

    async def close(self) -> None:
        await self._thread.close()
