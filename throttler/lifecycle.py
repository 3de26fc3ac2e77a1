"""Task transitions after the relay: started, retrying, succeeded, failed.

Each function runs inside the caller's transaction, changes a task only from a status
that allows the move, and appends the matching event. A task in a terminal status is
never changed again.

The batch forms (``start_attempts``, ``record_outcomes``) write many tasks with a few
prebuilt statements whatever their number, so a worker can group its concurrent jobs'
writes into one transaction (worker.taskkit.status_writer). They are synchronous, on a
``Connection`` or ``Session``: the worker runs them in a thread of their own on SQLite,
and through ``run_sync`` on an async connection elsewhere. The single-task forms, on an
``AsyncSession``, are the same code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from throttler.models import Task, TaskEvent
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

# What the batch forms run on: statements here are Core either way.
SyncExecutor = Connection | Session

_TASKS = cast(Table, Task.__table__)
_EVENTS = cast(Table, TaskEvent.__table__)
_NOT_TERMINAL = _TASKS.c.status.not_in([status.value for status in TERMINAL_STATUSES])

# Built once: a statement object caches its compiled form, and building one per batch
# would cost more than running it.
_START = (
    update(_TASKS)
    .where(_TASKS.c.id.in_(bindparam("task_ids", expanding=True)), _NOT_TERMINAL)
    .values(
        status=TaskStatus.RUNNING.value,
        attempts=_TASKS.c.attempts + 1,
        started_at=bindparam("now", type_=_TASKS.c.started_at.type),
    )
    .returning(_TASKS.c.id, _TASKS.c.name, _TASKS.c.payload, _TASKS.c.attempts)
)
# Lock the rows (FOR UPDATE on PostgreSQL; SQLite writers hold the database from BEGIN).
_LIVE = (
    select(_TASKS.c.id)
    .where(_TASKS.c.id.in_(bindparam("task_ids", expanding=True)), _NOT_TERMINAL)
    .with_for_update()
)
_INSERT_EVENTS = insert(_EVENTS)
_UPDATE_BY_ID = update(_TASKS).where(_TASKS.c.id == bindparam("task_key"))


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
        if self.event not in _OUTCOME_STATUS:
            raise ValueError(f"not an outcome event: {self.event!r}")

    @property
    def terminal(self) -> bool:
        return self.event is not EventKind.RETRYING

    def values(self) -> dict[str, Any]:
        """The task's columns this outcome sets."""
        values: dict[str, Any] = {
            "status": _OUTCOME_STATUS[self.event].value,
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


_OUTCOME_STATUS = {
    EventKind.SUCCEEDED: TaskStatus.SUCCEEDED,
    EventKind.FAILED: TaskStatus.FAILED,
    # Back to queued: ARQ holds the job for the next attempt.
    EventKind.RETRYING: TaskStatus.QUEUED,
}


def start_attempts(
    executor: SyncExecutor, *, task_ids: Sequence[str], worker_id: str, now: datetime
) -> dict[str, Attempt]:
    """Mark the tasks ``running`` and count an attempt each; leave out those already final.

    A task found ``running`` is a re-run after a worker died mid-attempt: it counts as a
    new start too. Two statements however many tasks.
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
            [
                {
                    "task_id": attempt.task_id,
                    "at": now,
                    "event": EventKind.STARTED.value,
                    "detail": {"attempt": attempt.attempt, "worker": worker_id},
                }
                for attempt in attempts.values()
            ],
        )
    return attempts


def record_outcomes(executor: SyncExecutor, outcomes: Sequence[Outcome]) -> set[str]:
    """Write each outcome whose task is not final yet; return the ids of those written.

    The tasks are read and locked first, so no other writer can finish one between the
    check and the update. Each task id may appear once. At most five statements (one
    update per kind of outcome) however many tasks.
    """
    if not outcomes:
        return set()
    ids = [outcome.task_id for outcome in outcomes]
    if len(set(ids)) != len(ids):
        raise ValueError("record_outcomes: a task id appears twice")
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
    executor.execute(
        _INSERT_EVENTS,
        [
            {
                "task_id": outcome.task_id,
                "at": outcome.now,
                "event": outcome.event.value,
                "detail": outcome.detail(),
            }
            for outcome in written
        ],
    )
    return {outcome.task_id for outcome in written}


async def start_attempt(
    session: AsyncSession, *, task_id: str, worker_id: str, now: datetime
) -> Attempt | None:
    """Mark the task ``running`` and count the attempt; None if it is already final."""
    started = await session.run_sync(
        lambda sync: start_attempts(sync, task_ids=[task_id], worker_id=worker_id, now=now)
    )
    return started.get(task_id)


async def record_success(
    session: AsyncSession,
    *,
    task_id: str,
    result: dict[str, Any],
    attempt: int,
    worker_id: str,
    now: datetime,
) -> bool:
    """Store the result and mark the task ``succeeded``; False if it was already final."""
    outcome = Outcome(
        task_id=task_id,
        event=EventKind.SUCCEEDED,
        attempt=attempt,
        worker_id=worker_id,
        now=now,
        result=result,
    )
    return bool(await session.run_sync(record_outcomes, [outcome]))


async def record_failure(
    session: AsyncSession,
    *,
    task_id: str,
    error: str,
    attempt: int,
    worker_id: str,
    now: datetime,
) -> bool:
    """Store the error and mark the task ``failed``; False if it was already final."""
    outcome = Outcome(
        task_id=task_id,
        event=EventKind.FAILED,
        attempt=attempt,
        worker_id=worker_id,
        now=now,
        error=error,
    )
    return bool(await session.run_sync(record_outcomes, [outcome]))


async def record_retry(
    session: AsyncSession,
    *,
    task_id: str,
    error: str,
    attempt: int,
    defer_s: float,
    worker_id: str,
    now: datetime,
) -> bool:
    """Put the task back to ``queued`` for a later attempt; False if it was already final."""
    outcome = Outcome(
        task_id=task_id,
        event=EventKind.RETRYING,
        attempt=attempt,
        worker_id=worker_id,
        now=now,
        error=error,
        defer_s=defer_s,
    )
    return bool(await session.run_sync(record_outcomes, [outcome]))


async def get_task(session: AsyncSession, *, task_id: str) -> Task | None:
    return (await session.execute(select(Task).where(Task.id == task_id))).scalar_one_or_none()
