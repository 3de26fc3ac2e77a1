"""PostgreSQL's attempts: the reference's transaction on the driver, in few round trips.

Through SQLAlchemy a worker's batch cost more of the worker's CPU than ARQ's own work on
the jobs (statement set-up, bind processing, result wrapping, a greenlet switch per
statement), and ten round trips. Here the batch runs on the pooled connection's asyncpg
driver itself, with the reference's statements compiled once (``throttler.store.compiled``):
the ids go in as one array (``= ANY($1)``), so each statement is prepared once per
connection whatever the batch size. Round trips: BEGIN with the transaction's settings
(one simple query), one locked read of every task the batch names (the reference reads
the starts' and the outcomes' apart), the start, one update per kind of outcome, a
retry's outbox rows, every event in one statement, COMMIT. The rows are the
reference's: tests/integration/store/test_attempts_parity.py.

A driver error is raised as SQLAlchemy raises it (``DBAPIError``, its SQLSTATE kept), so
the worker's status writer judges it like any other (``throttler.errors``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import ARRAY, Column, ColumnElement, Dialect, Table, any_, bindparam
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from throttler.job_ids import Dispatch
from throttler.statuses import EventKind
from throttler.store.attempts import (
    EVENTS,
    OUTBOX,
    TASKS,
    Attempt,
    AttemptWrites,
    CoreAttempts,
    Outcome,
    StartPlan,
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
from throttler.store.compiled import AttemptStatements, CompiledStatement
from throttler.store.fencing import BY_KEY_ONLY, idle_limit

# What asyncpg raises for the server's errors, its own (a lost connection) and a
# protocol out of step (a connection the server ended while it sat idle).
_DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Unnested:
    """A one-row statement run for many rows at once: one array per column, ``unnest``.

    One execution instead of an executemany's one per row: for a batch of 100 events that
    is most of the database's CPU per job. The values are converted by the one-row
    statement's own processors (``row``), so they are the reference's.
    """

    sql: str
    row: CompiledStatement

    @classmethod
    def insert(cls, table: Table, row: CompiledStatement, dialect: Dialect) -> _Unnested:
        # Every name is our own (the table's and the compiled statement's), none a value.
        columns = ", ".join(row.names)
        # WITH ORDINALITY ... ORDER BY: the rows take their ids in the order given.
        return cls(
            sql=f"INSERT INTO {table.name} ({columns}) SELECT {columns} "  # noqa: S608
            f"FROM unnest({_arrays(table, row.names, dialect)}) WITH ORDINALITY "
            f"AS u({columns}, n) ORDER BY n",
            row=row,
        )

    @classmethod
    def update(cls, row: CompiledStatement, dialect: Dialect) -> _Unnested:
        """``row``: an update of tasks by ``task_key`` (the id); its other names are the
        columns it sets."""
        columns = [name for name in row.names if name != "task_key"]
        assignments = ", ".join(f"{column} = u.{column}" for column in columns)
        return cls(
            sql=f"UPDATE tasks SET {assignments} "  # noqa: S608
            f"FROM unnest({_arrays(TASKS, row.names, dialect)}) AS u({', '.join(row.names)}) "
            "WHERE tasks.id = u.task_key",
            row=row,
        )

    def arrays(self, rows: Sequence[Mapping[str, Any]]) -> list[list[Any]]:
        """The rows' values, converted, as one list per column."""
        return [list(column) for column in zip(*(self.row.bind(row) for row in rows), strict=True)]


def _arrays(table: Table, names: Sequence[str], dialect: Dialect) -> str:
    """``$1::T1[], $2::T2[], ...``: one array parameter per column of ``names``."""
    types = [
        table.c["id" if name == "task_key" else name].type.compile(dialect=dialect)
        for name in names
    ]
    return ", ".join(f"${index}::{type_}[]" for index, type_ in enumerate(types, start=1))


@dataclass(frozen=True, kw_only=True, slots=True)
class _UnnestedWrites:
    """The batch's many-row writes, each one statement."""

    update: dict[EventKind, _Unnested]
    insert_event: _Unnested
    insert_outbox: _Unnested

    @classmethod
    def of(cls, statements: AttemptStatements, dialect: Dialect) -> _UnnestedWrites:
        return cls(
            update={
                event: _Unnested.update(row, dialect) for event, row in statements.update.items()
            },
            insert_event=_Unnested.insert(EVENTS, statements.insert_event, dialect),
            insert_outbox=_Unnested.insert(OUTBOX, statements.insert_outbox, dialect),
        )


def _ids_in_array(column: Column[Any]) -> ColumnElement[bool]:
    """``column = ANY(the ids, one array parameter)``."""
    return column == any_(bindparam("task_ids", value=None, type_=ARRAY(column.type)))


async def _write(
    driver: Any,
    statements: AttemptStatements,
    unnest: _UnnestedWrites,
    *,
    starts: Sequence[Dispatch],
    outcomes: Sequence[Outcome],
    worker_id: str,
    now: datetime,
) -> AttemptWrites:
    """The batch's statements, in the caller's transaction on ``driver``."""
    named = [start.task_id for start in starts] + [outcome.task_id for outcome in outcomes]
    locked = statements.locked
    rows = dispatched_rows(
        await driver.fetch(locked.sql, *locked.bind({"task_ids": list(dict.fromkeys(named))})),
        statements.queued_at,
    )
    plan = plan_starts(starts, rows) if starts else StartPlan(to_start=[], orphaned={})
    attempts: dict[str, Attempt] = {}
    events: list[dict[str, Any]] = []
    if plan.to_start:
        start = statements.start
        started = await driver.fetch(
            start.sql, *start.bind({"task_ids": plan.to_start, "now": now})
        )
        attempts = started_attempts(plan, started, statements.payload)
        events = [started_event(a, worker_id=worker_id, now=now) for a in attempts.values()]
    # What the reference's second read would see: the tasks just started are running.
    running = running_attempts(rows) | {
        task_id: attempt.attempt for task_id, attempt in attempts.items()
    }
    written = current_on(outcomes, running)
    for event, updates in outcome_values(written).items():
        unnested = unnest.update[event]
        await driver.execute(unnested.sql, *unnested.arrays(updates))
    again = [outcome for outcome in written if outcome.again]
    if again:
        delete_outbox = statements.delete_outbox
        await driver.execute(
            delete_outbox.sql,
            *delete_outbox.bind({"task_ids": [outcome.task_id for outcome in again]}),
        )
        await driver.execute(
            unnest.insert_outbox.sql,
            *unnest.insert_outbox.arrays([outcome.outbox_row() for outcome in again]),
        )
    # Starts' events first, then outcomes': the reference's order, so the same event ids.
    events += [outcome_event(outcome) for outcome in written]
    if events:
        await driver.execute(unnest.insert_event.sql, *unnest.insert_event.arrays(events))
    return AttemptWrites(
        started={**plan.orphaned, **attempts},
        recorded={outcome.task_id for outcome in written},
    )


class PostgresAttempts(CoreAttempts):
    """The reference's transaction, on the driver of a connection the store holds.

    One connection, checked out of the engine's pool once and kept: the pool's check-out
    ping alone (three round trips with SQLAlchemy's asyncpg dialect) would cost what the
    batch's own statements cost. A batch that fails on it hands it back invalidated (a
    server restarted or a network cut leaves it broken), and the next batch checks out a
    fresh one. The worker writes one batch at a time (worker.taskkit.status_writer);
    concurrent calls take turns.
    """

    def __init__(self, engine: AsyncEngine, *, idle_timeout_s: float) -> None:
        # The idle limit goes into this store's own BEGIN (below), not the reference's.
        super().__init__(engine)
        self._statements = AttemptStatements.compile(engine.dialect, _ids_in_array)
        self._unnest = _UnnestedWrites.of(self._statements, engine.dialect)
        settings = idle_limit(idle_timeout_s, **BY_KEY_ONLY).compile(
            dialect=engine.dialect, compile_kwargs={"literal_binds": True}
        )
        # One simple query: the transaction and its settings (store.fencing) in one trip.
        self._begin = f"BEGIN; {settings}"
        self._connection: AsyncConnection | None = None
        self._turn = asyncio.Lock()

    async def write(
        self,
        *,
        starts: Sequence[Dispatch],
        outcomes: Sequence[Outcome],
        worker_id: str,
        now: datetime,
    ) -> AttemptWrites:
        check_unique(outcomes)
        if not starts and not outcomes:
            return AttemptWrites(started={}, recorded=set())
        async with self._turn:
            if self._connection is None:
                self._connection = await self._engine.connect()
            connection = self._connection
            driver: Any = (await connection.get_raw_connection()).driver_connection
            try:
                await driver.execute(self._begin)
                writes = await _write(
                    driver,
                    self._statements,
                    self._unnest,
                    starts=starts,
                    outcomes=outcomes,
                    worker_id=worker_id,
                    now=now,
                )
                await driver.execute("COMMIT")
            except BaseException as error:
                invalidated = await self._abandon(driver)
                if isinstance(error, _DRIVER_ERRORS):
                    raise DBAPIError.instance(
                        "attempts batch",
                        None,
                        error,
                        Exception,
                        connection_invalidated=invalidated,
                        dialect=self._engine.dialect,
                    ) from error
                raise
            return writes

    async def _abandon(self, driver: Any) -> bool:
        """Roll the batch back; a connection that cannot is given up (True).

        ROLLBACK whatever the driver believes: a connection the server ended between
        batches may not know it yet, and only a clean ROLLBACK proves it usable.
        """
        try:
            if not driver.is_closed():
                await driver.execute("ROLLBACK")
                return False
        except (*_DRIVER_ERRORS, OSError, TimeoutError):
            pass
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.invalidate()
            await connection.close()
        return True

    async def close(self) -> None:
        """Hand the held connection back to the pool."""
        async with self._turn:
            connection, self._connection = self._connection, None
            if connection is not None:
                await connection.close()
