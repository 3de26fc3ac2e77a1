"""Explicit retries: a ``failed`` or ``cancelled`` task back to ``pending`` through the outbox.

The only way out of those terminal statuses (SPEC, Statuses). One transaction per call
does what an attempt's ``retrying`` outcome does (throttler.store.attempts), and more:

- the task: ``pending``, ``run_at`` now, ``error``, ``result`` and ``finished_at``
  cleared (the last error stays in its ``failed`` event, the history keeps every one);
  ``attempts`` keeps counting, and ``tries_base`` takes its value, so a worker counts
  only the attempts after the retry against the task's tries: a task that used all its
  tries, or a side-effecting one, runs again because the user asked for it.
  ``queued_at`` and ``started_at`` keep the last attempt's until the next one sets them;
- a new outbox row, replacing any the task still has, so the relay releases the attempt
  under every limit like any other;
- a ``retried`` event, ``detail`` ``{"by": account, "attempts": n}``.

Writes are guarded: a task changes only while it is still failed or cancelled, its row
locked first (FOR UPDATE on PostgreSQL; SQLite writers hold the database from BEGIN
IMMEDIATE), so two concurrent retries of one task make one ``retried`` event and one
outbox row; the other gets the task as it then stands. Portable SQLAlchemy Core: a
retry is a user's action, not a hot path, so no dialect override.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import ClassVar

from sqlalchemy import Connection, bindparam, select
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import EVENTS, OUTBOX, TASKS
from throttler.store.reads import VIEW_COLUMNS, TaskView, task_view
from throttler.store.task_filter import TaskFilter, chunks, count_matching, lock_oldest

RETRIABLE_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.CANCELLED})
# Tasks one retry-by-filter changes at most: one transaction holds their row locks, so it
# stays short; the answer counts the matching tasks left, and the caller calls again.
MAX_RETRIES_PER_CALL = 10_000


class RetryOutcome(StrEnum):
    RETRIED = "retried"
    NOT_FOUND = "not_found"  # no such task in this account
    WRONG_STATUS = "wrong_status"  # neither failed nor cancelled: nothing changed


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryAnswer:
    """What a retry of one task did, and the task as it stands after (None if not found)."""

    outcome: RetryOutcome
    view: TaskView | None


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryFilter(TaskFilter):
    """The tasks a retry by filter takes: the account's, in ``statuses`` (failed or
    cancelled only), of ``name``, carrying ``label``, created before ``created_before``."""

    applies_to: ClassVar[frozenset[TaskStatus]] = RETRIABLE_STATUSES
    operation: ClassVar[str] = "retried"

    statuses: frozenset[TaskStatus] = RETRIABLE_STATUSES


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryCount:
    """What a retry by filter did: ``count`` tasks retried, ``remaining`` still matching."""

    count: int
    remaining: int


_RETRIABLE = sorted(status.value for status in RETRIABLE_STATUSES)
_VIEW = select(*VIEW_COLUMNS).where(
    TASKS.c.id == bindparam("task_id"), TASKS.c.account == bindparam("account")
)
_LOCK = (
    select(TASKS.c.status)
    .where(TASKS.c.id == bindparam("task_id"), TASKS.c.account == bindparam("account"))
    .with_for_update()
)
_RETRY = (
    TASKS.update()
    .where(
        TASKS.c.id.in_(bindparam("task_ids", expanding=True)),
        # The guard: a task changed since it was read stays as it is.
        TASKS.c.status.in_(_RETRIABLE),
    )
    .values(
        status=TaskStatus.PENDING.value,
        run_at=bindparam("now", type_=TASKS.c.run_at.type),
        error=None,
        result=None,
        finished_at=None,
        tries_base=TASKS.c.attempts,
    )
    .returning(TASKS.c.id, TASKS.c.attempts)
)
_DELETE_OUTBOX = OUTBOX.delete().where(OUTBOX.c.task_id.in_(bindparam("task_ids", expanding=True)))


def _retry_ids(connection: Connection, task_ids: Sequence[str], *, by: str, now: datetime) -> int:
    """Retry those of ``task_ids`` still failed or cancelled (rows locked by the caller)."""
    retried = 0
    for chunk in chunks(task_ids):
        rows = connection.execute(_RETRY, {"task_ids": chunk, "now": now}).all()
        if not rows:
            continue
        ids = [task_id for task_id, _ in rows]
        connection.execute(_DELETE_OUTBOX, {"task_ids": ids})
        connection.execute(
            OUTBOX.insert(), [{"task_id": task_id, "created_at": now} for task_id in ids]
        )
        connection.execute(
            EVENTS.insert(),
            [
                {
                    "task_id": task_id,
                    "at": now,
                    "event": EventKind.RETRIED.value,
                    "detail": {"by": by, "attempts": attempts},
                }
                for task_id, attempts in rows
            ],
        )
        retried += len(rows)
    return retried


def retry_task(connection: Connection, *, task_id: str, account: str, now: datetime) -> RetryAnswer:
    """Retry one task of ``account``, in the caller's transaction."""
    key = {"task_id": task_id, "account": account}
    status = connection.execute(_LOCK, key).scalar_one_or_none()
    if status is None:
        return RetryAnswer(outcome=RetryOutcome.NOT_FOUND, view=None)
    outcome = RetryOutcome.WRONG_STATUS
    if status in _RETRIABLE and _retry_ids(connection, [task_id], by=account, now=now):
        outcome = RetryOutcome.RETRIED
    view = task_view(connection.execute(_VIEW, key).one())
    return RetryAnswer(outcome=outcome, view=view)


def retry_matching(
    connection: Connection, selection: RetryFilter, *, now: datetime, limit: int
) -> RetryCount:
    """Retry the oldest ``limit`` tasks ``selection`` matches, in the caller's transaction."""
    where = selection.where()
    ids = [task_id for (task_id,) in lock_oldest(connection, where, limit=limit)]
    count = _retry_ids(connection, ids, by=selection.account, now=now)
    # Those retried are pending now; what still matches is what a next call would take.
    return RetryCount(count=count, remaining=count_matching(connection, where))


class RetryStore:
    """Explicit retries, each call one transaction on a connection of ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def retry(self, *, task_id: str, account: str, now: datetime) -> RetryAnswer:
        def work(connection: Connection) -> RetryAnswer:
            return retry_task(connection, task_id=task_id, account=account, now=now)

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    async def retry_matching(
        self, selection: RetryFilter, *, now: datetime, limit: int = MAX_RETRIES_PER_CALL
    ) -> RetryCount:
        def work(connection: Connection) -> RetryCount:
            return retry_matching(connection, selection, now=now, limit=limit)

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)
