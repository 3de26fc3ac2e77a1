"""Recovery's reads and writes: lost tasks back to the outbox, retention, the last dispatch.

The reconciler (throttler.reconcile) decides; this module only reads candidates and applies
its decisions with guarded writes. ``SqlRecoveryStore`` is the reference, in portable
SQLAlchemy Core: its row locks (``FOR UPDATE SKIP LOCKED``) are PostgreSQL's way of letting
several reconcilers and pruners work side by side, and SQLite, where a write transaction
holds the one write lock from its BEGIN, renders them as nothing. No dialect pays for an
override here: these run every few seconds (reconciler) or minutes (pruner), or once after
Redis lost the drain floor (``last_dispatch_at``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from sqlalchemy import ColumnElement, and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from throttler.db import SessionFactory, create_read_session_factory, create_session_factory
from throttler.models import OutboxEntry, Task, TaskEvent, TaskLabel
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus
from throttler.store.fencing import idle_limit

_TERMINAL = sorted(status.value for status in TERMINAL_STATUSES)


@dataclass(frozen=True, kw_only=True, slots=True)
class RecoveryCandidate:
    """A queued or running task outside the grace period, without an outbox row."""

    task_id: str
    name: str
    status: TaskStatus
    attempts: int
    started_at: datetime | None
    # ``attempts`` at the task's last explicit retry (throttler.store.retries): only the
    # attempts after it may have started since.
    tries_base: int = 0
    # When the relay released it: names its ARQ job (throttler.job_ids).
    queued_at: datetime | None = None


class RecoveryUnit(Protocol):
    """One write transaction of the reconciler: lock, then requeue or fail each task.

    Every write is guarded: it changes the task only while it is still as the candidate
    says (same status, same attempt count, no outbox row, outside the grace period), so a
    worker or relay transition that lands first wins.
    """

    async def lock(self, candidates: Sequence[RecoveryCandidate]) -> list[RecoveryCandidate]:
        """Lock the candidates still as scanned; skip those another transaction holds."""
        ...

    async def requeue(self, candidate: RecoveryCandidate, *, reason: str) -> bool:
        """Back to ``pending`` with a new outbox row and a ``requeued`` event; False if changed."""
        ...

    async def fail(self, candidate: RecoveryCandidate, *, reason: str, error: str) -> bool:
        """End ``failed`` with ``error`` and a ``failed`` event; False if the task changed."""
        ...


class RecoveryStore(Protocol):
    """The reads and writes of recovery, retention and the drain floor."""

    async def candidates(
        self, *, grace_cutoff: datetime, after_task_id: str, limit: int
    ) -> list[RecoveryCandidate]:
        """Queued tasks queued before, and running tasks started before, ``grace_cutoff``.

        Only tasks without an outbox row (a relay's lease covers those), by id, past
        ``after_task_id``, at most ``limit``. Reads without taking SQLite's write lock.
        """
        ...

    def recovering(
        self, *, grace_cutoff: datetime, now: datetime
    ) -> AbstractAsyncContextManager[RecoveryUnit]:
        """Open one write transaction; it commits when the block ends without error."""
        ...

    async def prune_finished(self, *, finished_before: datetime, limit: int) -> int:
        """Delete up to ``limit`` terminal tasks finished before then, with their rows.

        One transaction; return how many tasks went. Tasks another pruner holds are skipped.
        """
        ...

    async def last_dispatch_at(self) -> datetime | None:
        """The latest ``queued_at`` of any task (None: nothing dispatched yet)."""
        ...


def _recoverable(*, grace_cutoff: datetime) -> ColumnElement[bool]:
    """Queued or running, outside the grace period, and holding no outbox row."""
    # A task with an outbox row is pending, or leased by a relay that may be enqueueing
    # it right now: the relay's lease covers it. queued_at may lie up to half a second
    # ahead (a relay reserving tokens), which the grace period absorbs.
    return and_(
        or_(
            and_(
                Task.status == TaskStatus.QUEUED,
                or_(Task.queued_at.is_(None), Task.queued_at < grace_cutoff),
            ),
            and_(
                Task.status == TaskStatus.RUNNING,
                or_(Task.started_at.is_(None), Task.started_at < grace_cutoff),
            ),
        ),
        ~exists().where(OutboxEntry.task_id == Task.id),
    )


class SqlRecoveryUnit:
    """The reference ``RecoveryUnit``: guarded statements in the caller's transaction."""

    def __init__(self, session: AsyncSession, *, grace_cutoff: datetime, now: datetime) -> None:
        self._session = session
        self._grace_cutoff = grace_cutoff
        self._now = now

    def _unchanged(self, candidate: RecoveryCandidate) -> ColumnElement[bool]:
        return and_(
            Task.id == candidate.task_id,
            Task.status == candidate.status,
            Task.attempts == candidate.attempts,
            _recoverable(grace_cutoff=self._grace_cutoff),
        )

    async def lock(self, candidates: Sequence[RecoveryCandidate]) -> list[RecoveryCandidate]:
        if not candidates:
            return []
        rows = await self._session.execute(
            select(Task.id, Task.status, Task.attempts)
            .where(
                Task.id.in_([candidate.task_id for candidate in candidates]),
                _recoverable(grace_cutoff=self._grace_cutoff),
            )
            .with_for_update(of=Task, skip_locked=True)
        )
        seen = {row.id: (TaskStatus(row.status), row.attempts) for row in rows}
        return [
            candidate
            for candidate in candidates
            if seen.get(candidate.task_id) == (candidate.status, candidate.attempts)
        ]

    async def requeue(self, candidate: RecoveryCandidate, *, reason: str) -> bool:
        changed = (
            await self._session.execute(
                update(Task)
                .where(self._unchanged(candidate))
                .values(status=TaskStatus.PENDING, queued_at=None)
                .returning(Task.id)
            )
        ).one_or_none()
        if changed is None:
            return False
        await self._session.execute(
            insert(OutboxEntry).values(task_id=candidate.task_id, created_at=self._now)
        )
        await self._add_event(candidate, EventKind.REQUEUED, reason=reason)
        return True

    async def fail(self, candidate: RecoveryCandidate, *, reason: str, error: str) -> bool:
        changed = (
            await self._session.execute(
                update(Task)
                .where(self._unchanged(candidate))
                .values(status=TaskStatus.FAILED, error=error, finished_at=self._now)
                .returning(Task.id)
            )
        ).one_or_none()
        if changed is None:
            return False
        await self._add_event(candidate, EventKind.FAILED, reason=reason, error=error)
        return True

    async def _add_event(
        self,
        candidate: RecoveryCandidate,
        event: EventKind,
        *,
        reason: str,
        error: str | None = None,
    ) -> None:
        detail: dict[str, object] = {
            "reason": reason,
            "previous_status": candidate.status.value,
            "attempt": candidate.attempts,
        }
        if error is not None:
            detail["error"] = error
        await self._session.execute(
            insert(TaskEvent).values(
                task_id=candidate.task_id, at=self._now, event=event, detail=detail
            )
        )


class SqlRecoveryStore:
    """The reference ``RecoveryStore``, in portable SQLAlchemy Core."""

    def __init__(
        self,
        *,
        sessions: SessionFactory,
        read_sessions: SessionFactory,
        idle_timeout_s: float | None = None,
    ) -> None:
        self._sessions = sessions
        self._read_sessions = read_sessions
        # PostgreSQL: a recovery whose reconciler went silent this long ends (None: never).
        self._idle_timeout_s = idle_timeout_s

    async def candidates(
        self, *, grace_cutoff: datetime, after_task_id: str, limit: int
    ) -> list[RecoveryCandidate]:
        async with self._read_sessions() as session:
            rows = await session.execute(
                select(
                    Task.id,
                    Task.name,
                    Task.status,
                    Task.attempts,
                    Task.tries_base,
                    Task.started_at,
                    Task.queued_at,
                )
                .where(_recoverable(grace_cutoff=grace_cutoff), Task.id > after_task_id)
                .order_by(Task.id)
                .limit(limit)
            )
            return [
                RecoveryCandidate(
                    task_id=row.id,
                    name=row.name,
                    status=TaskStatus(row.status),
                    attempts=row.attempts,
                    tries_base=row.tries_base,
                    started_at=row.started_at,
                    queued_at=row.queued_at,
                )
                for row in rows
            ]

    @asynccontextmanager
    async def recovering(
        self, *, grace_cutoff: datetime, now: datetime
    ) -> AsyncIterator[RecoveryUnit]:
        async with self._sessions.begin() as session:
            if self._idle_timeout_s is not None:
                # The unit re-checks Redis while it holds its rows (store.fencing).
                await session.execute(idle_limit(self._idle_timeout_s))
            yield SqlRecoveryUnit(session, grace_cutoff=grace_cutoff, now=now)

    async def prune_finished(self, *, finished_before: datetime, limit: int) -> int:
        async with self._sessions.begin() as session:
            task_ids = list(
                (
                    await session.execute(
                        select(Task.id)
                        .where(Task.status.in_(_TERMINAL), Task.finished_at < finished_before)
                        .limit(limit)
                        .with_for_update(of=Task, skip_locked=True)
                    )
                ).scalars()
            )
            if not task_ids:
                return 0
            # Explicit deletes rather than ON DELETE CASCADE alone: SQLite enforces it only
            # with foreign keys switched on, which a tool opening the file may not do.
            await session.execute(delete(TaskEvent).where(TaskEvent.task_id.in_(task_ids)))
            await session.execute(delete(OutboxEntry).where(OutboxEntry.task_id.in_(task_ids)))
            await session.execute(delete(TaskLabel).where(TaskLabel.task_id.in_(task_ids)))
            await session.execute(
                delete(Task).where(Task.id.in_(task_ids), Task.status.in_(_TERMINAL))
            )
            return len(task_ids)

    async def last_dispatch_at(self) -> datetime | None:
        # One scan of the tasks table, asked only when Redis has lost the drain floor.
        async with self._read_sessions() as session:
            latest: datetime | None = await session.scalar(select(func.max(Task.queued_at)))
            return latest


def open_recovery(settings: Settings, engine: AsyncEngine) -> RecoveryStore:
    """Return the recovery store for ``engine``: the reference, on every database.

    ``settings`` is where a dialect override would be chosen; none pays (module docstring).
    """
    return SqlRecoveryStore(
        sessions=create_session_factory(engine),
        read_sessions=create_read_session_factory(engine),
        # PostgreSQL only: on SQLite a vanished writer holds nothing (store.fencing).
        idle_timeout_s=None if settings.is_sqlite else settings.database_timeout_s,
    )
