"""The outbox: accept a task durably, and let relays claim and release it.

Repository functions take a session inside the caller's transaction and never commit.

A relay hands tasks to ARQ in two steps so that a crash at any point loses nothing and
runs nothing twice:

1. One transaction: ``throttler.claim.select_claimable`` locks unleased rows (accounts
   in turn), the in-flight caps and the throttle admit what they allow, and
   ``lease_scheduled`` leases those to the relay, marks their tasks ``queued`` and
   writes the ``queued`` events. The rows stay, leased to this relay.
2. The relay enqueues each task into ARQ with the task id as the ARQ job id.
3. ``release_claimed`` (one transaction): delete the leased rows.

A relay that dies between 1 and 3 leaves leased rows behind; once the lease lapses
another relay (or the same one restarted) claims them again. Their tasks are already
``queued``, so no second event is written, and the repeat enqueue is a no-op because ARQ
refuses a job id whose job or result key still exists. A task that meanwhile started
or finished is not enqueued again at all: its row is only deleted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.claim import ClaimedTask
from throttler.constants import CLAIM_LOCK_KEY
from throttler.limits import LimitKey, Scope
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.statuses import INFLIGHT_STATUSES, EventKind, TaskStatus

# Submission lives in throttler.submit; its names stay importable from here.
from throttler.submit import NewTask as NewTask
from throttler.submit import new_task_id as new_task_id

_TASKS = cast(Table, Task.__table__)
_EVENTS = cast(Table, TaskEvent.__table__)


async def lease(
    session: AsyncSession,
    *,
    claims: Sequence[ClaimedTask],
    relay_id: str,
    now: datetime,
    lease_s: float,
) -> None:
    """Lease selected rows to this relay and mark their pending tasks ``queued``."""
    if not claims:
        return
    await session.execute(
        update(OutboxEntry)
        .where(OutboxEntry.id.in_([claim.outbox_id for claim in claims]))
        .values(claimed_by=relay_id, claimed_until=now + timedelta(seconds=lease_s))
    )
    pending = [claim.task_id for claim in claims if claim.status == TaskStatus.PENDING]
    if pending:
        await mark_queued(session, task_ids=pending, relay_id=relay_id, now=now)


async def mark_queued(
    session: AsyncSession, *, task_ids: Sequence[str], relay_id: str, now: datetime
) -> None:
    """Move pending tasks to ``queued`` and record one ``queued`` event each."""
    await session.execute(
        update(Task)
        .where(Task.id.in_(task_ids), Task.status == TaskStatus.PENDING)
        .values(status=TaskStatus.QUEUED, queued_at=now)
    )
    await session.execute(
        insert(TaskEvent),
        [
            {
                "task_id": task_id,
                "at": now,
                "event": EventKind.QUEUED,
                "detail": {"relay": relay_id},
            }
            for task_id in task_ids
        ],
    )


async def release_claimed(
    session: AsyncSession, *, relay_id: str, outbox_ids: Sequence[int]
) -> None:
    """Delete outbox rows this relay has handed to ARQ."""
    if outbox_ids:
        await session.execute(
            delete(OutboxEntry).where(
                OutboxEntry.id.in_(outbox_ids), OutboxEntry.claimed_by == relay_id
            )
        )


async def count_outbox(session: AsyncSession) -> int:
    """Count rows still in the outbox (leased or not)."""
    return int((await session.execute(select(func.count()).select_from(OutboxEntry))).scalar_one())


async def count_inflight(session: AsyncSession) -> int:
    """Count tasks handed to ARQ and not yet finished (they hold in-flight slots)."""
    query = select(func.count()).select_from(Task).where(Task.status.in_(_INFLIGHT))
    return int((await session.execute(query)).scalar_one())


_INFLIGHT = sorted(status.value for status in INFLIGHT_STATUSES)
_SCOPE_COLUMNS = {Scope.TASK: Task.name, Scope.ACCOUNT: Task.account, Scope.HOST: Task.host}


async def count_inflight_by_key(
    session: AsyncSession, *, scopes: Iterable[Scope]
) -> dict[LimitKey, int]:
    """Count in-flight tasks per key of the given scopes (the cluster as one key)."""
    counts: dict[LimitKey, int] = {}
    for scope in sorted(set(scopes)):
        if scope is Scope.CLUSTER:
            counts[LimitKey(scope=scope)] = await count_inflight(session)
            continue
        column = _SCOPE_COLUMNS[scope]
        rows = await session.execute(
            select(column, func.count())
            .where(Task.status.in_(_INFLIGHT), column.is_not(None))
            .group_by(column)
        )
        for value, count in rows:
            counts[LimitKey(scope=scope, value=value)] = int(count)
    return counts


async def count_leased(session: AsyncSession, *, now: datetime) -> int:
    """Count outbox rows leased to a live relay: admitted, maybe not yet in ARQ."""
    query = (
        select(func.count())
        .select_from(OutboxEntry)
        .where(OutboxEntry.claimed_until.is_not(None), OutboxEntry.claimed_until >= now)
    )
    return int((await session.execute(query)).scalar_one())


async def serialize_claims(session: AsyncSession) -> None:
    """Make concurrent claim transactions take turns until they commit.

    Needed when a claim counts in-flight tasks: under READ COMMITTED two relays would
    otherwise both see the same free slots. SQLite's ``BEGIN IMMEDIATE`` already
    serializes every writer, so only PostgreSQL takes the advisory lock.
    """
    if session.get_bind().dialect.name == "postgresql":
        await session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))


async def lease_scheduled(
    session: AsyncSession,
    *,
    claims: Sequence[ClaimedTask],
    queued_at: Sequence[datetime],
    relay_id: str,
    lease_s: float,
) -> None:
    """Lease rows like ``lease``, giving each pending task its own ``queued_at``.

    For a relay that took tokens ahead: each task is queued at the moment its token
    falls due. Three statements however many distinct moments there are.
    """
    if not claims:
        return
    await session.execute(
        update(OutboxEntry)
        .where(OutboxEntry.id.in_([claim.outbox_id for claim in claims]))
        .values(claimed_by=relay_id, claimed_until=max(queued_at) + timedelta(seconds=lease_s))
    )
    pending = [
        {"b_task_id": claim.task_id, "b_queued_at": at}
        for claim, at in zip(claims, queued_at, strict=True)
        if claim.status == TaskStatus.PENDING
    ]
    if not pending:
        return
    moments = {row["b_queued_at"] for row in pending}
    if len(moments) == 1:
        # Unthrottled, every task goes at the grant: one statement, not one per task.
        await session.execute(
            update(_TASKS)
            .where(
                _TASKS.c.id.in_([row["b_task_id"] for row in pending]),
                _TASKS.c.status == TaskStatus.PENDING,
            )
            .values(status=TaskStatus.QUEUED, queued_at=moments.pop())
        )
    else:
        # Core UPDATE: one parameter set per task (the ORM form would demand primary keys).
        await session.execute(
            update(_TASKS)
            .where(_TASKS.c.id == bindparam("b_task_id"), _TASKS.c.status == TaskStatus.PENDING)
            .values(status=TaskStatus.QUEUED, queued_at=bindparam("b_queued_at")),
            pending,
        )
    # Core, not the ORM's bulk path, which costs more than the insert itself.
    await session.execute(
        insert(_EVENTS),
        [
            {
                "task_id": row["b_task_id"],
                "at": row["b_queued_at"],
                "event": EventKind.QUEUED,
                "detail": {"relay": relay_id},
            }
            for row in pending
        ],
    )
