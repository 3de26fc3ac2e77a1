"""Cancels: a ``pending``, ``queued`` or ``running`` task to ``cancelled``, at once.

SPEC, Cancel and Guarantee 5. One transaction per call, as explicit retries
(throttler.store.retries) do:

- the task: ``cancelled``, ``finished_at`` now;
- its outbox row deleted, if any (a pending task's, or a queued one's a relay still
  holds leased: its ``release`` then deletes nothing);
- a ``cancelled`` event, ``detail`` ``{"by": account, "from": previous status, "force": bool}``.

In-flight caps count tasks by status (``throttler.store.outbox.count_inflight_by_key``),
so a cancelled queued or running task's slot is free once this commits. Nothing else
can undo it: a worker starts only a task ``queued`` on its job's dispatch and records an
outcome only on a task still ``running`` on that attempt (throttler.store.attempts), a
relay marks only ``pending`` tasks ``queued`` (throttler.store.outbox), and recovery
touches only queued and running tasks (throttler.store.recovery). So a cancelled task
never starts, and a running one's late outcome is discarded; the caller interrupts a
running attempt through its ARQ job (``interrupt``: job ids, throttler.aborts).

A running side-effecting task (``throttler.catalog``) is not interrupted unless the
cancel forces it: it may be half-way through its effect, and its outcome is recorded.

Writes are guarded: the rows are locked first (FOR UPDATE on PostgreSQL; SQLite writers
hold the database from BEGIN IMMEDIATE) and change only while still cancellable, so two
concurrent cancels (or a cancel and a retry) of one task make one event. Portable
SQLAlchemy Core: a cancel is a user's action, not a hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, ClassVar

from sqlalchemy import ColumnElement, Connection, Row, and_, bindparam, not_, select
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.catalog import CATALOG
from throttler.job_ids import Dispatch
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import EVENTS, OUTBOX, TASKS
from throttler.store.reads import VIEW_COLUMNS, TaskView, task_view
from throttler.store.task_filter import TaskFilter, chunks, count_matching, lock_oldest

CANCELLABLE_STATUSES = frozenset({TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING})
# Tasks one cancel-by-filter changes at most: one transaction holds their row locks, so it
# stays short; the answer counts the matching tasks left, and the caller calls again.
MAX_CANCELS_PER_CALL = 10_000
# The kinds whose running attempts are left alone unless a cancel forces it.
SIDE_EFFECTING_NAMES = frozenset(spec.name for spec in CATALOG.values() if spec.side_effecting)


class CancelOutcome(StrEnum):
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"  # no such task in this account
    FINISHED = "finished"  # already succeeded, failed or cancelled: nothing changed
    SIDE_EFFECTING = "side_effecting"  # running and side-effecting, not forced: unchanged


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelAnswer:
    """What a cancel of one task did, the task as it stands after (None if not found), and
    the ARQ job to interrupt (a running attempt's) if any."""

    outcome: CancelOutcome
    view: TaskView | None
    interrupt: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelFilter(TaskFilter):
    """The tasks a cancel by filter takes: the account's, in ``statuses`` (pending, queued
    or running only), of ``name``, created before ``created_before``."""

    applies_to: ClassVar[frozenset[TaskStatus]] = CANCELLABLE_STATUSES
    operation: ClassVar[str] = "cancelled"

    statuses: frozenset[TaskStatus] = CANCELLABLE_STATUSES


@dataclass(frozen=True, kw_only=True, slots=True)
class CancelCount:
    """What a cancel by filter did: ``count`` tasks cancelled (``task_ids``), ``remaining``
    still matching, ``skipped`` running side-effecting ones left alone (not forced), and
    the ARQ jobs of the running attempts cancelled (``interrupt``)."""

    count: int
    remaining: int
    skipped: int = 0
    task_ids: list[str] = field(default_factory=list)
    interrupt: list[str] = field(default_factory=list)


_CANCELLABLE = sorted(status.value for status in CANCELLABLE_STATUSES)
_KEY = and_(TASKS.c.id == bindparam("task_id"), TASKS.c.account == bindparam("account"))
_VIEW = select(*VIEW_COLUMNS).where(_KEY)
_LOCKED_COLUMNS = (TASKS.c.id, TASKS.c.status, TASKS.c.queued_at, TASKS.c.name)
_LOCK = select(*_LOCKED_COLUMNS).where(_KEY).with_for_update()
_CANCEL = (
    TASKS.update()
    .where(
        TASKS.c.id.in_(bindparam("task_ids", expanding=True)),
        # The guard: a task changed since it was read stays as it is.
        TASKS.c.status.in_(_CANCELLABLE),
    )
    .values(
        status=TaskStatus.CANCELLED.value,
        finished_at=bindparam("now", type_=TASKS.c.finished_at.type),
    )
    .returning(TASKS.c.id)
)
_DELETE_OUTBOX = OUTBOX.delete().where(OUTBOX.c.task_id.in_(bindparam("task_ids", expanding=True)))


@dataclass(frozen=True, kw_only=True, slots=True)
class _Locked:
    """A task row as a cancel locked it."""

    task_id: str
    status: TaskStatus
    queued_at: datetime | None
    name: str

    def left_alone(self, protected: frozenset[str]) -> bool:
        """A running attempt of a protected (side-effecting, not forced) kind."""
        return self.status is TaskStatus.RUNNING and self.name in protected

    @property
    def job_id(self) -> str:
        """The ARQ job of the task's current dispatch (throttler.job_ids)."""
        return Dispatch.of(self.task_id, queued_at=self.queued_at).job_id


def _locked(row: Row[*tuple[Any, ...]]) -> _Locked:
    """A row of ``_LOCKED_COLUMNS``."""
    task_id, status, queued_at, name = tuple(row)
    return _Locked(task_id=task_id, status=TaskStatus(status), queued_at=queued_at, name=name)


def _not_protected(protected: frozenset[str]) -> list[ColumnElement[bool]]:
    """Leave out running attempts of the protected kinds."""
    if not protected:
        return []
    return [
        not_(and_(TASKS.c.status == TaskStatus.RUNNING.value, TASKS.c.name.in_(sorted(protected))))
    ]


def _cancel_rows(
    connection: Connection, rows: Sequence[_Locked], *, by: str, force: bool, now: datetime
) -> list[_Locked]:
    """Cancel those of ``rows`` still cancellable (locked by the caller); return them."""
    by_id = {row.task_id: row for row in rows}
    cancelled: list[_Locked] = []
    for chunk in chunks(list(by_id)):
        ids = list(connection.execute(_CANCEL, {"task_ids": chunk, "now": now}).scalars())
        if not ids:
            continue
        connection.execute(_DELETE_OUTBOX, {"task_ids": ids})
        connection.execute(
            EVENTS.insert(),
            [
                {
                    "task_id": task_id,
                    "at": now,
                    "event": EventKind.CANCELLED.value,
                    "detail": {"by": by, "from": by_id[task_id].status.value, "force": force},
                }
                for task_id in ids
            ],
        )
        cancelled += [by_id[task_id] for task_id in ids]
    return cancelled


def cancel_task(
    connection: Connection,
    *,
    task_id: str,
    account: str,
    now: datetime,
    force: bool = False,
    side_effecting: frozenset[str] = SIDE_EFFECTING_NAMES,
) -> CancelAnswer:
    """Cancel one task of ``account``, in the caller's transaction."""
    key = {"task_id": task_id, "account": account}
    found = connection.execute(_LOCK, key).one_or_none()
    if found is None:
        return CancelAnswer(outcome=CancelOutcome.NOT_FOUND, view=None)
    row = _locked(found)
    interrupt: str | None = None
    if row.status not in CANCELLABLE_STATUSES:
        outcome = CancelOutcome.FINISHED
    elif row.left_alone(frozenset() if force else side_effecting):
        outcome = CancelOutcome.SIDE_EFFECTING
    else:
        _cancel_rows(connection, [row], by=account, force=force, now=now)
        outcome = CancelOutcome.CANCELLED
        if row.status is TaskStatus.RUNNING:
            interrupt = row.job_id
    view = task_view(connection.execute(_VIEW, key).one())
    return CancelAnswer(outcome=outcome, view=view, interrupt=interrupt)


def cancel_matching(
    connection: Connection,
    selection: CancelFilter,
    *,
    now: datetime,
    limit: int,
    force: bool = False,
    side_effecting: frozenset[str] = SIDE_EFFECTING_NAMES,
) -> CancelCount:
    """Cancel the oldest ``limit`` tasks ``selection`` matches, in the caller's transaction.

    Without ``force``, running side-effecting tasks are left alone and counted apart
    (``skipped``), not in ``remaining``: a client calling until nothing remains stops.
    """
    protected = frozenset() if force else side_effecting
    where = [*selection.where(), *_not_protected(protected)]
    rows = [
        _locked(row) for row in lock_oldest(connection, where, limit=limit, columns=_LOCKED_COLUMNS)
    ]
    cancelled = _cancel_rows(connection, rows, by=selection.account, force=force, now=now)
    skipped = 0
    if protected and TaskStatus.RUNNING in selection.statuses:
        skipped = count_matching(
            connection,
            [
                *selection.where(),
                TASKS.c.status == TaskStatus.RUNNING.value,
                TASKS.c.name.in_(sorted(protected)),
            ],
        )
    return CancelCount(
        count=len(cancelled),
        # Those cancelled are final now; what still matches is what a next call would take.
        remaining=count_matching(connection, where),
        skipped=skipped,
        task_ids=[row.task_id for row in cancelled],
        interrupt=[row.job_id for row in cancelled if row.status is TaskStatus.RUNNING],
    )


class CancelStore:
    """Cancels, each call one transaction on a connection of ``engine``.

    ``side_effecting``: the task kinds whose running attempts a cancel leaves alone unless
    forced (the catalog's; a test may name others).
    """

    def __init__(
        self, engine: AsyncEngine, *, side_effecting: frozenset[str] = SIDE_EFFECTING_NAMES
    ) -> None:
        self._engine = engine
        self.side_effecting = side_effecting

    async def cancel(
        self, *, task_id: str, account: str, now: datetime, force: bool = False
    ) -> CancelAnswer:
        def work(connection: Connection) -> CancelAnswer:
            return cancel_task(
                connection,
                task_id=task_id,
                account=account,
                now=now,
                force=force,
                side_effecting=self.side_effecting,
            )

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    async def cancel_matching(
        self,
        selection: CancelFilter,
        *,
        now: datetime,
        force: bool = False,
        limit: int = MAX_CANCELS_PER_CALL,
    ) -> CancelCount:
        def work(connection: Connection) -> CancelCount:
            return cancel_matching(
                connection,
                selection,
                now=now,
                limit=limit,
                force=force,
                side_effecting=self.side_effecting,
            )

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)
