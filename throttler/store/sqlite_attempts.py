"""SQLite's attempts: the reference's transaction, on a thread of its own, on plain sqlite3.

Through SQLAlchemy a batch of ten writes cost about three times the CPU of the same
statements on the driver (statement set-up, bind processing, result wrapping), and on a
worker that CPU is taken from ARQ's own loop; through aiosqlite each statement is also a
round trip to the driver's thread. So here the whole batch runs on a dedicated thread
(``throttler.store.sqlite_thread``) with its own connection, one hop per batch.

The statements are the reference's, compiled once for SQLite (``throttler.store.compiled``);
the ids of a batch go in as one JSON array (``json_each``). The rows are the reference's:
checked in tests/integration/store/test_attempts_parity.py.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache

from sqlalchemy.dialects.sqlite import dialect as sqlite_dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.job_ids import Dispatch
from throttler.settings import Settings
from throttler.store.attempts import (
    Attempt,
    AttemptWrites,
    CoreAttempts,
    DispatchedRow,
    Outcome,
    check_unique,
    current_on,
    dispatched_rows,
    outcome_event,
    outcome_values,
    plan_starts,
    running_attempts,
    started_attempts,
    started_event,
)
from throttler.store.compiled import AttemptStatements
from throttler.store.sqlite_ids import ids_in_json, json_ids
from throttler.store.sqlite_thread import SQLiteThread

_DIALECT = sqlite_dialect(paramstyle="qmark")


@lru_cache(maxsize=1)
def _statements() -> AttemptStatements:
    return AttemptStatements.compile(_DIALECT, ids_in_json)


def _locked(connection: sqlite3.Connection, task_ids: Sequence[str]) -> list[DispatchedRow]:
    locked = _statements().locked
    rows = connection.execute(locked.sql, locked.bind({"task_ids": json_ids(task_ids)}))
    return dispatched_rows(rows, _statements().queued_at)


def _start(
    connection: sqlite3.Connection, *, starts: Sequence[Dispatch], worker_id: str, now: datetime
) -> dict[str, Attempt]:
    if not starts:
        return {}
    statements = _statements()
    plan = plan_starts(starts, _locked(connection, [start.task_id for start in starts]))
    if not plan.to_start:
        return plan.orphaned
    task_ids = plan.to_start
    start = statements.start
    rows = connection.execute(
        start.sql, start.bind({"task_ids": json_ids(task_ids), "now": now})
    ).fetchall()
    attempts = started_attempts(plan, rows, statements.payload)
    if attempts:
        insert_event = statements.insert_event
        connection.executemany(
            insert_event.sql,
            insert_event.bind_many(
                [
                    started_event(attempt, worker_id=worker_id, now=now)
                    for attempt in attempts.values()
                ]
            ),
        )
    return {**plan.orphaned, **attempts}


def _record(connection: sqlite3.Connection, outcomes: Sequence[Outcome]) -> set[str]:
    if not outcomes:
        return set()
    check_unique(outcomes)
    statements = _statements()
    running = running_attempts(_locked(connection, [outcome.task_id for outcome in outcomes]))
    written = current_on(outcomes, running)
    if not written:
        return set()
    for event, rows in outcome_values(written).items():
        update = statements.update[event]
        connection.executemany(update.sql, update.bind_many(rows))
    again = [outcome for outcome in written if outcome.again]
    if again:
        delete_outbox, insert_outbox = statements.delete_outbox, statements.insert_outbox
        connection.execute(
            delete_outbox.sql,
            delete_outbox.bind({"task_ids": json_ids(outcome.task_id for outcome in again)}),
        )
        connection.executemany(
            insert_outbox.sql, insert_outbox.bind_many([outcome.outbox_row() for outcome in again])
        )
    insert_event = statements.insert_event
    connection.executemany(
        insert_event.sql, insert_event.bind_many([outcome_event(outcome) for outcome in written])
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
