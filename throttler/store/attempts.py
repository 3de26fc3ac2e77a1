"""Start attempts and record outcomes: task transitions after the relay.

A batch changes each task only from a status that allows the move and appends the
matching event; a task in a terminal status is never changed again. Starts and outcomes
of many tasks go in ONE transaction with a few statements whatever their number, so a
worker group-commits its concurrent jobs' writes (worker.taskkit.status_writer).

``Attempts`` is the seam; ``CoreAttempts`` the reference in portable SQLAlchemy Core;
``open_attempts`` returns it or SQLite's fast path (``throttler.store.sqlite_attempts``),
checked against it row by row in tests/integration/store/test_attempts_parity.py.
PostgreSQL runs the reference: asyncpg is natively async, one hop per statement costs
no thread switch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

from throttler.models import Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

# What the reference's statements run on: Core either way.
SyncExecutor = Connection | Session

TASKS = cast(Table, Task.__table__)
EVENTS = cast(Table, TaskEvent.__table__)
NOT_TERMINAL = TASKS.c.status.not_in([status.value for status in TERMINAL_STATUSES])


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """A started attempt: which one it is, and what the task was asked to do."""

    task_id: str
    name: str
    payload: dict[str, Any]
    attempt: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """How one attempt ended, ready to write: ``succeeded``, ``failed`` or ``retrying``."""

    task_id: str
    # EventKind.SUCCEEDED, FAILED or RETRYING; the task's status follows from it.
    event: EventKind
    attempt: int
    worker_id: str
    now: datetime
    result: dict[str, Any] | None = None
    error: str | None = None
    # Retrying only: the delay before the next attempt, kept in the event for the audit.
    defer_s: float | None = None

    def __post_init__(self) -> None:
        if self.event not in OUTCOME_STATUS:
            raise ValueError(f"not an outcome event: {self.event!r}")

    @property
    def terminal(self) -> bool:
        return self.event is not EventKind.RETRYING

    def values(self) -> dict[str, Any]:
        """The task's columns this outcome sets."""
        values: dict[str, Any] = {
            "status": OUTCOME_STATUS[self.event].value,
            "error": self.error,
        }
        if self.event is EventKind.SUCCEEDED:
            values["result"] = self.result
        if self.terminal:
            values["finished_at"] = self.now
        return values

    def detail(self) -> dict[str, Any]:
        """The ``detail`` of the outcome's event."""
        detail: dict[str, Any] = {"attempt": self.attempt, "worker": self.worker_id}
        if self.event is not EventKind.SUCCEEDED:
            detail["error"] = self.error
        if self.defer_s is not None:
            detail["defer_s"] = self.defer_s
        return detail


OUTCOME_STATUS = {
    EventKind.SUCCEEDED: TaskStatus.SUCCEEDED,
    EventKind.FAILED: TaskStatus.FAILED,
    # Back to queued: ARQ holds the job for the next attempt.
    EventKind.RETRYING: TaskStatus.QUEUED,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class AttemptWrites:
    """What a batch wrote: the attempts started (by task id) and the ids whose outcome was
    recorded (a task already final is in neither)."""

    started: dict[str, Attempt]
    recorded: set[str]


class Attempts(Protocol):
    """Where workers record starts and outcomes."""

    async def write(
        self, *, starts: Sequence[str], outcomes: Sequence[Outcome], worker_id: str, now: datetime
    ) -> AttemptWrites:
        """Start ``starts`` (at ``now``) and record ``outcomes`` in ONE transaction.

        Each task id at most once among the outcomes. Raises SQLAlchemy's exception for a
        failed transaction (nothing of it written).
        """
        ...

    async def close(self) -> None:
        """Release what the store opened itself (not the engine)."""
        ...


def started_event(attempt: Attempt, *, worker_id: str, now: datetime) -> dict[str, Any]:
    return {
        "task_id": attempt.task_id,
        "at": now,
        "event": EventKind.STARTED.value,
        "detail": {"attempt": attempt.attempt, "worker": worker_id},
    }


def outcome_event(outcome: Outcome) -> dict[str, Any]:
    return {
        "task_id": outcome.task_id,
        "at": outcome.now,
        "event": outcome.event.value,
        "detail": outcome.detail(),
    }


def check_unique(outcomes: Sequence[Outcome]) -> None:
    ids = [outcome.task_id for outcome in outcomes]
    if len(set(ids)) != len(ids):
        raise ValueError("record_outcomes: a task id appears twice")


# Built once: a statement object caches its compiled form, and building one per batch
# would cost more than running it.
_START = (
    update(TASKS)
    .where(TASKS.c.id.in_(bindparam("task_ids", expanding=True)), NOT_TERMINAL)
    .values(
        status=TaskStatus.RUNNING.value,
        attempts=TASKS.c.attempts + 1,
        started_at=bindparam("now", type_=TASKS.c.started_at.type),
    )
    .returning(TASKS.c.id, TASKS.c.name, TASKS.c.payload, TASKS.c.attempts)
)
# Lock the rows (FOR UPDATE on PostgreSQL; SQLite writers hold the database from BEGIN).
_LIVE = (
    select(TASKS.c.id)
    .where(TASKS.c.id.in_(bindparam("task_ids", expanding=True)), NOT_TERMINAL)
    .with_for_update()
)
_INSERT_EVENTS = insert(EVENTS)
_UPDATE_BY_ID = update(TASKS).where(TASKS.c.id == bindparam("task_key"))


def start_attempts(
    executor: SyncExecutor, *, task_ids: Sequence[str], worker_id: str, now: datetime
) -> dict[str, Attempt]:
    """Mark the tasks ``running`` and count an attempt each; leave out those already final.

    A task found ``running`` is a re-run after a worker died mid-attempt: it counts as a
    new start too. Two statements however many tasks, in the caller's transaction.
    """
    if not task_ids:
        return {}
    rows = executor.execute(_START, {"task_ids": list(task_ids), "now": now}).all()
    attempts = {
        task_id: Attempt(task_id=task_id, name=name, payload=payload, attempt=attempt)
        for task_id, name, payload, attempt in rows
    }
    if attempts:
        executor.execute(
            _INSERT_EVENTS,
            [started_event(attempt, worker_id=worker_id, now=now) for attempt in attempts.values()],
        )
    return attempts


def record_outcomes(executor: SyncExecutor, outcomes: Sequence[Outcome]) -> set[str]:
    """Write each outcome whose task is not final yet; return the ids of those written.

    The tasks are read and locked first, so no other writer can finish one between the
    check and the update. Each task id may appear once. At most five statements (one
    update per kind of outcome) however many tasks, in the caller's transaction.
    """
    if not outcomes:
        return set()
    check_unique(outcomes)
    ids = [outcome.task_id for outcome in outcomes]
    live = set(executor.execute(_LIVE, {"task_ids": ids}).scalars())
    written = [outcome for outcome in outcomes if outcome.task_id in live]
    if not written:
        return set()
    # One executemany per shape of values (succeeded, failed, retrying).
    by_event: dict[EventKind, list[dict[str, Any]]] = {}
    for outcome in written:
        by_event.setdefault(outcome.event, []).append(
            {"task_key": outcome.task_id, **outcome.values()}
        )
    for rows in by_event.values():
        executor.execute(_UPDATE_BY_ID, rows)
    executor.execute(_INSERT_EVENTS, [outcome_event(outcome) for outcome in written])
    return {outcome.task_id for outcome in written}


def write_attempts(
    executor: SyncExecutor,
    *,
    starts: Sequence[str],
    outcomes: Sequence[Outcome],
    worker_id: str,
    now: datetime,
) -> AttemptWrites:
    """``start_attempts`` then ``record_outcomes``, in the caller's transaction."""
    started = start_attempts(executor, task_ids=starts, worker_id=worker_id, now=now)
    return AttemptWrites(started=started, recorded=record_outcomes(executor, outcomes))


class CoreAttempts:
    """The reference: each batch a transaction on a connection of ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def write(
        self, *, starts: Sequence[str], outcomes: Sequence[Outcome], worker_id: str, now: datetime
    ) -> AttemptWrites:
        def work(connection: Connection) -> AttemptWrites:
            return write_attempts(
                connection, starts=starts, outcomes=outcomes, worker_id=worker_id, now=now
            )

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    async def close(self) -> None:
        """Nothing of its own: the engine belongs to the caller."""


def open_attempts(settings: Settings, engine: AsyncEngine) -> Attempts:
    """The attempts store for ``DATABASE_URL``: SQLite's fast path, else the reference."""
    if settings.is_sqlite:
        from throttler.store.sqlite_attempts import SQLiteAttempts

        return SQLiteAttempts(settings, engine)
    return CoreAttempts(engine)
