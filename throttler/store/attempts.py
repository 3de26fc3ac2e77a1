"""Start attempts and record outcomes: task transitions after the relay.

A batch changes each task only from a status that allows the move and appends the
matching event; a task in a terminal status is never changed again. An attempt starts
only from ``queued``, on the dispatch the job names (``throttler.job_ids``): a stale ARQ
job (an earlier dispatch of the task) starts nothing; an outcome changes only a task
still ``running`` on its attempt, so a cancelled task's late outcome (a blocking thread
cannot be interrupted) is discarded. An outcome that calls for another
attempt (``retrying``, or ``requeued`` when the worker stopped mid-attempt) puts the task
back in the outbox in the same transaction: ``pending``, ``run_at`` at the backoff
moment, a new outbox row; the relay then releases the next attempt under every limit, as
it did the first (SPEC, Statuses). Starts and outcomes
of many tasks go in ONE transaction with a few statements whatever their number, so a
worker group-commits its concurrent jobs' writes (worker.taskkit.status_writer).

``Attempts`` is the seam; ``CoreAttempts`` the reference in portable SQLAlchemy Core;
``open_attempts`` returns a fast path on the driver (``throttler.store.sqlite_attempts``,
``throttler.store.postgres_attempts``), each checked against it row by row in
tests/integration/store/test_attempts_parity.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from sqlalchemy import (
    Column,
    ColumnElement,
    Connection,
    Select,
    Table,
    bindparam,
    delete,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import ReturningUpdate

from throttler.job_ids import Dispatch
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.fencing import BY_KEY_ONLY, idle_limit

# What the reference's statements run on: Core either way.
SyncExecutor = Connection | Session
# A driver's conversion of one value (a SQLAlchemy bind or result processor).
Processor = Callable[[Any], Any]

TASKS = cast(Table, Task.__table__)
EVENTS = cast(Table, TaskEvent.__table__)
OUTBOX = cast(Table, OutboxEntry.__table__)


@dataclass(frozen=True, kw_only=True, slots=True)
class Attempt:
    """A started attempt: which one it is, and what the task was asked to do."""

    task_id: str
    name: str
    payload: dict[str, Any]
    attempt: int
    # ``attempts`` when the task was last explicitly retried (0 if never): the tries the
    # task has used are the attempts since (``try_number``), ``attempt`` keeps counting.
    tries_base: int = 0
    # The task was already ``running`` on this very dispatch: ARQ delivered the job again
    # because the worker holding it died (its in-progress lease lapsed, worker.leases).
    # Nothing was written and nothing is to run (``payload`` is left empty): the worker
    # puts the task back through the outbox, or fails it if side-effecting.
    orphaned: bool = False

    @property
    def try_number(self) -> int:
        """Which try of the task's budget this is: 1 for the first attempt after submission
        or after an explicit retry (``throttler.store.retries``)."""
        return self.attempt - self.tries_base


@dataclass(frozen=True, kw_only=True, slots=True)
class Outcome:
    """How one attempt ended, ready to write: ``succeeded``, ``failed`` or ``retrying``."""

    task_id: str
    # EventKind.SUCCEEDED, FAILED, RETRYING or REQUEUED; the task's status follows from it.
    event: EventKind
    attempt: int
    worker_id: str
    now: datetime
    result: dict[str, Any] | None = None
    error: str | None = None
    # Back to the outbox only: the delay before the next attempt may be released (its
    # run_at), kept in the event for the audit.
    defer_s: float | None = None
    # Requeued only: why the attempt was cut short, kept in the event. Retrying: why, when
    # not a failure (``upstream``: a push-back, see worker.taskkit.backpressure).
    reason: str | None = None
    # Retrying only (required): the task's ``tries_base`` after this attempt. The
    # attempt's own, or one more when the attempt spends none of the task's tries (an
    # upstream push-back: the request was refused before it was done). Every retrying
    # outcome writes it, so each kind of outcome keeps one shape of update.
    tries_base: int | None = None

    def __post_init__(self) -> None:
        if self.event not in OUTCOME_STATUS:
            raise ValueError(f"not an outcome event: {self.event!r}")
        if (self.event is EventKind.RETRYING) != (self.tries_base is not None):
            raise ValueError("tries_base is required for retrying outcomes, and only there")

    @property
    def terminal(self) -> bool:
        return not self.again

    @property
    def again(self) -> bool:
        """Whether the task goes back to the outbox for another attempt."""
        return OUTCOME_STATUS[self.event] is TaskStatus.PENDING

    def values(self) -> dict[str, Any]:
        """The task's columns this outcome sets."""
        values: dict[str, Any] = {
            "status": OUTCOME_STATUS[self.event].value,
            "error": self.error,
        }
        if self.event is EventKind.SUCCEEDED:
            values["result"] = self.result
        if self.event is EventKind.RETRYING:
            values["tries_base"] = self.tries_base
        if self.terminal:
            values["finished_at"] = self.now
        else:
            # The relay claims the row once run_at is due, under the limits.
            values["run_at"] = self.now + timedelta(seconds=self.defer_s or 0.0)
        return values

    def detail(self) -> dict[str, Any]:
        """The ``detail`` of the outcome's event."""
        detail: dict[str, Any] = {"attempt": self.attempt, "worker": self.worker_id}
        if self.reason is not None:
            detail["reason"] = self.reason
        if self.event is not EventKind.SUCCEEDED:
            detail["error"] = self.error
        if self.defer_s is not None:
            detail["defer_s"] = self.defer_s
        return detail

    def outbox_row(self) -> dict[str, Any]:
        """The outbox row of the next attempt (``again`` only)."""
        return {"task_id": self.task_id, "created_at": self.now}


OUTCOME_STATUS = {
    EventKind.SUCCEEDED: TaskStatus.SUCCEEDED,
    EventKind.FAILED: TaskStatus.FAILED,
    # Back to the outbox: the relay releases the next attempt under the limits.
    EventKind.RETRYING: TaskStatus.PENDING,
    # The worker stopped mid-attempt: back to the outbox, at once (no backoff).
    EventKind.REQUEUED: TaskStatus.PENDING,
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
        self,
        *,
        starts: Sequence[Dispatch],
        outcomes: Sequence[Outcome],
        worker_id: str,
        now: datetime,
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
_DISPATCHED = frozenset((TaskStatus.QUEUED.value, TaskStatus.RUNNING.value))
# Every statement of a batch finds its tasks by primary key ALONE; the status each needs is
# checked on the rows read (locked), in Python. With a status condition beside the ids,
# PostgreSQL may read the tasks through the status index instead, and when its statistics
# say the status is rare while a burst has just made it common (20,000 tasks queued at
# once), it reads every queued task for each batch: 4-7 ms a batch at 20,000, most of the
# database's CPU in the end-to-end bench (test_attempts_plans.py).
# Nor may PostgreSQL scan the table: its cost model prices a scan of a table of some
# 20,000 rows below 100 look-ups in the primary key, then spends 2 ms a statement passing
# every row through the id list. Scans are off for the batch's transaction (BY_KEY_ONLY,
# set with the fencing's idle limit, one statement).
Among = Callable[[Column[Any]], ColumnElement[bool]]


def in_list(column: Column[Any]) -> ColumnElement[bool]:
    """``column IN (the batch's ids)``: the reference's form, one placeholder per id."""
    return column.in_(bindparam("task_ids", expanding=True))


def locked_rows(among: Among = in_list) -> Select[Any]:
    """The batch's tasks, locked (FOR UPDATE on PostgreSQL; SQLite writers hold the
    database from BEGIN): a start needs the moment each was released (its dispatch), an
    outcome the status and attempt count."""
    return (
        select(TASKS.c.id, TASKS.c.status, TASKS.c.queued_at, TASKS.c.name, TASKS.c.attempts)
        .where(among(TASKS.c.id))
        .with_for_update()
    )


def start_statement(among: Among = in_list) -> ReturningUpdate[Any]:
    """Start the tasks read ``queued`` (and locked since: no status condition needed)."""
    return (
        update(TASKS)
        .where(among(TASKS.c.id))
        .values(
            status=TaskStatus.RUNNING.value,
            attempts=TASKS.c.attempts + 1,
            started_at=bindparam("now", value=None, type_=TASKS.c.started_at.type),
        )
        .returning(TASKS.c.id, TASKS.c.name, TASKS.c.payload, TASKS.c.attempts, TASKS.c.tries_base)
    )


_LOCKED = locked_rows()
_START = start_statement()
_INSERT_EVENTS = insert(EVENTS)
_UPDATE_BY_ID = update(TASKS).where(TASKS.c.id == bindparam("task_key"))
# The next attempt's outbox row replaces any the task still has (one per task): a relay
# that enqueued this attempt may have died before deleting its row.
_DELETE_OUTBOX = delete(OUTBOX).where(in_list(OUTBOX.c.task_id))
_INSERT_OUTBOX = insert(OUTBOX)


@dataclass(frozen=True, kw_only=True, slots=True)
class DispatchedRow:
    """A task of the batch as ``locked_rows`` reads it."""

    task_id: str
    status: str
    queued_at: datetime | None
    name: str
    attempts: int


@dataclass(frozen=True, kw_only=True, slots=True)
class StartPlan:
    """What a batch of starts does: the ids to start, and the orphaned attempts found."""

    to_start: list[str]
    orphaned: dict[str, Attempt]


def plan_starts(starts: Sequence[Dispatch], rows: Sequence[DispatchedRow]) -> StartPlan:
    """Match each start to its task's current dispatch; a stale job's start is left out.

    A ``queued`` task on the job's dispatch starts; a ``running`` one on it is orphaned
    (``Attempt.orphaned``).
    """
    by_id = {row.task_id: row for row in rows}
    to_start: list[str] = []
    orphaned: dict[str, Attempt] = {}
    for start in starts:
        row = by_id.get(start.task_id)
        if row is None or row.status not in _DISPATCHED or not start.is_current(row.queued_at):
            continue
        if row.status == TaskStatus.QUEUED.value:
            to_start.append(row.task_id)
        else:
            orphaned[row.task_id] = Attempt(
                task_id=row.task_id, name=row.name, payload={}, attempt=row.attempts, orphaned=True
            )
    return StartPlan(to_start=to_start, orphaned=orphaned)


def started_attempts(
    plan: StartPlan, rows: Iterable[Any], load_payload: Processor | None = None
) -> dict[str, Attempt]:
    """The start statement's rows as attempts, in the order of ``plan.to_start``: the
    order an UPDATE returns its rows in follows the database's plan, and the ids of the
    attempts' events must not. ``load_payload``: the driver's conversion, if any."""
    returned = {
        task_id: Attempt(
            task_id=task_id,
            name=name,
            payload=payload if load_payload is None else load_payload(payload),
            attempt=attempt,
            tries_base=base,
        )
        for task_id, name, payload, attempt, base in rows
    }
    return {task_id: returned[task_id] for task_id in plan.to_start if task_id in returned}


def outcome_values(outcomes: Iterable[Outcome]) -> dict[EventKind, list[dict[str, Any]]]:
    """Each outcome's task values, keyed ``task_key`` by id, grouped by kind: one update
    statement per kind (each kind sets its own columns)."""
    by_event: dict[EventKind, list[dict[str, Any]]] = {}
    for outcome in outcomes:
        values = {"task_key": outcome.task_id, **outcome.values()}
        by_event.setdefault(outcome.event, []).append(values)
    return by_event


def start_attempts(
    executor: SyncExecutor, *, starts: Sequence[Dispatch], worker_id: str, now: datetime
) -> dict[str, Attempt]:
    """Mark the tasks ``running`` and count an attempt each, for those ``queued`` on the
    dispatch their job names; leave out the others (final, back in the outbox, or on a
    later dispatch).

    A task found ``running`` on the job's dispatch is a re-delivery after its worker died:
    it is not started again (that attempt would bypass the outbox and the limits), but
    returned as ``orphaned`` for the worker to put back through the outbox. Three
    statements however many tasks, in the caller's transaction.
    """
    if not starts:
        return {}
    rows = executor.execute(_LOCKED, {"task_ids": [start.task_id for start in starts]})
    plan = plan_starts(starts, dispatched_rows(rows))
    if not plan.to_start:
        return plan.orphaned
    started = executor.execute(_START, {"task_ids": plan.to_start, "now": now})
    attempts = started_attempts(plan, started)
    if attempts:
        executor.execute(
            _INSERT_EVENTS,
            [started_event(attempt, worker_id=worker_id, now=now) for attempt in attempts.values()],
        )
    return {**plan.orphaned, **attempts}


def running_attempts(rows: Iterable[DispatchedRow]) -> dict[str, int]:
    """The attempt count of each running task among ``rows``."""
    return {row.task_id: row.attempts for row in rows if row.status == TaskStatus.RUNNING.value}


def dispatched_rows(rows: Iterable[Any], load_at: Processor | None = None) -> list[DispatchedRow]:
    """``locked_rows``' rows as named values (``load_at``: the driver's ``queued_at``
    conversion, when the rows come from the driver rather than SQLAlchemy)."""
    return [
        DispatchedRow(
            task_id=task_id,
            status=status,
            queued_at=at if load_at is None or at is None else load_at(at),
            name=name,
            attempts=attempts,
        )
        for task_id, status, at, name, attempts in rows
    ]


def current_on(outcomes: Sequence[Outcome], running: Mapping[str, int]) -> list[Outcome]:
    """The outcomes whose task is still running on their attempt (``running``: the
    attempt count of each running task).

    Any other outcome is discarded: the task was cancelled (a blocking thread's result
    arriving after the cancel), finished, or put back in the outbox by recovery, perhaps
    retried and running again on a later attempt, which this late outcome must not end.
    """
    return [outcome for outcome in outcomes if running.get(outcome.task_id) == outcome.attempt]


def record_outcomes(executor: SyncExecutor, outcomes: Sequence[Outcome]) -> set[str]:
    """Write each outcome whose task is still running on its attempt; return the ids of
    those written (``current_on``).

    The tasks are read and locked first, so no other writer (a cancel, recovery) can
    change one between the check and the update. An outcome that calls for another
    attempt also replaces the task's outbox row. Each task id may appear once. At most
    eight statements (one update per kind of outcome) however many tasks, in the
    caller's transaction.
    """
    if not outcomes:
        return set()
    check_unique(outcomes)
    ids = [outcome.task_id for outcome in outcomes]
    running = running_attempts(dispatched_rows(executor.execute(_LOCKED, {"task_ids": ids})))
    written = current_on(outcomes, running)
    if not written:
        return set()
    # One executemany per shape of values (succeeded, failed, retrying).
    for rows in outcome_values(written).values():
        executor.execute(_UPDATE_BY_ID, rows)
    again = [outcome for outcome in written if outcome.again]
    if again:
        executor.execute(_DELETE_OUTBOX, {"task_ids": [outcome.task_id for outcome in again]})
        executor.execute(_INSERT_OUTBOX, [outcome.outbox_row() for outcome in again])
    executor.execute(_INSERT_EVENTS, [outcome_event(outcome) for outcome in written])
    return {outcome.task_id for outcome in written}


def write_attempts(
    executor: SyncExecutor,
    *,
    starts: Sequence[Dispatch],
    outcomes: Sequence[Outcome],
    worker_id: str,
    now: datetime,
) -> AttemptWrites:
    """``start_attempts`` then ``record_outcomes``, in the caller's transaction."""
    started = start_attempts(executor, starts=starts, worker_id=worker_id, now=now)
    return AttemptWrites(started=started, recorded=record_outcomes(executor, outcomes))


class CoreAttempts:
    """The reference: each batch a transaction on a connection of ``engine``.

    ``idle_timeout_s`` (PostgreSQL): a batch whose worker went silent that long ends,
    and releases its tasks' rows (throttler.store.fencing); None: no limit.
    """

    def __init__(self, engine: AsyncEngine, *, idle_timeout_s: float | None = None) -> None:
        self._engine = engine
        self._idle_limit = (
            None if idle_timeout_s is None else idle_limit(idle_timeout_s, **BY_KEY_ONLY)
        )

    async def write(
        self,
        *,
        starts: Sequence[Dispatch],
        outcomes: Sequence[Outcome],
        worker_id: str,
        now: datetime,
    ) -> AttemptWrites:
        def work(connection: Connection) -> AttemptWrites:
            return write_attempts(
                connection, starts=starts, outcomes=outcomes, worker_id=worker_id, now=now
            )

        async with self._engine.begin() as connection:
            if self._idle_limit is not None:
                await connection.execute(self._idle_limit)
            return await connection.run_sync(work)

    async def close(self) -> None:
        """Nothing of its own: the engine belongs to the caller."""


def open_attempts(settings: Settings, engine: AsyncEngine) -> Attempts:
    """The attempts store for ``DATABASE_URL``: its database's fast path."""
    if settings.is_sqlite:
        from throttler.store.sqlite_attempts import SQLiteAttempts

        return SQLiteAttempts(settings, engine)
    from throttler.store.postgres_attempts import PostgresAttempts

    return PostgresAttempts(engine, idle_timeout_s=settings.database_timeout_s)
