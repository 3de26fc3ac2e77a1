"""The outbox: accept a task durably, and let relays claim and release it.

Repository functions take a session inside the caller's transaction and never commit.

A relay hands tasks to ARQ in two steps so that a crash at any point loses nothing and
runs nothing twice:

1. One transaction: ``select_claimable`` locks the oldest unleased rows, the throttle
   admits as many as it allows, and ``lease`` leases those to the relay, marks their tasks
   ``queued`` and writes the ``queued`` events. The rows stay, leased to this relay.
2. The relay enqueues each task into ARQ with the task id as the ARQ job id.
3. ``release_claimed`` (one transaction): delete the leased rows.

A relay that dies between 1 and 3 leaves leased rows behind; once the lease lapses
another relay (or the same one restarted) claims them again. Their tasks are already
``queued``, so no second event is written, and the repeat enqueue is a no-op because ARQ
refuses a job id whose job or result key still exists. A task that meanwhile started
or finished is not enqueued again at all: its row is only deleted.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.constants import CLAIM_LOCK_KEY
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.statuses import INFLIGHT_STATUSES, EventKind, TaskStatus


def new_task_id() -> str:
    return str(uuid.uuid4())


async def submit_task(
    session: AsyncSession,
    *,
    name: str,
    account: str,
    payload: Mapping[str, Any],
    now: datetime,
    priority: int = 5,
    host: str | None = None,
    run_at: datetime | None = None,
    task_id: str | None = None,
) -> Task:
    """Add a pending task, its outbox row and its ``submitted`` event to the session."""
    task = Task(
        id=task_id or new_task_id(),
        name=name,
        account=account,
        payload=dict(payload),
        status=TaskStatus.PENDING,
        priority=priority,
        host=host,
        run_at=run_at,
        attempts=0,
        created_at=now,
    )
    session.add(task)
    # Flush the parent first: the outbox and event rows reference it by foreign key.
    await session.flush()
    session.add(OutboxEntry(task_id=task.id, created_at=now))
    session.add(
        TaskEvent(task_id=task.id, at=now, event=EventKind.SUBMITTED, detail={"account": account})
    )
    await session.flush()
    return task


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimedTask:
    """An outbox row a relay may lease, with what it needs to enqueue the task."""

    outbox_id: int
    task_id: str
    name: str
    account: str
    payload: dict[str, Any]
    status: TaskStatus

    @property
    def needs_enqueue(self) -> bool:
        # False when the task already started or finished (a lease recovered after a
        # crash): its row is only released, never enqueued again.
        return self.status in (TaskStatus.PENDING, TaskStatus.QUEUED)


async def select_claimable(
    session: AsyncSession, *, limit: int, now: datetime
) -> list[ClaimedTask]:
    """Lock up to ``limit`` of the oldest unleased (or lease-expired) outbox rows.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets concurrent relays take disjoint rows;
    on SQLite the transaction itself holds the database's write lock (``BEGIN IMMEDIATE``).
    """
    if limit <= 0:
        return []
    rows = (
        await session.execute(
            select(OutboxEntry.id, Task.id, Task.name, Task.account, Task.payload, Task.status)
            .join(Task, Task.id == OutboxEntry.task_id)
            .where(or_(OutboxEntry.claimed_until.is_(None), OutboxEntry.claimed_until < now))
            .order_by(OutboxEntry.id)
            .limit(limit)
            .with_for_update(of=OutboxEntry, skip_locked=True)
        )
    ).all()
    return [
        ClaimedTask(
            outbox_id=outbox_id,
            task_id=task_id,
            name=name,
            account=account,
            payload=payload,
            status=TaskStatus(status),
        )
        for outbox_id, task_id, name, account, payload, status in rows
    ]


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
    statuses = [status.value for status in INFLIGHT_STATUSES]
    query = select(func.count()).select_from(Task).where(Task.status.in_(statuses))
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
    # Core UPDATE: one parameter set per task (the ORM form would demand primary keys).
    tasks = cast(Table, Task.__table__)
    await session.execute(
        update(tasks)
        .where(tasks.c.id == bindparam("b_task_id"), tasks.c.status == TaskStatus.PENDING)
        .values(status=TaskStatus.QUEUED, queued_at=bindparam("b_queued_at")),
        pending,
    )
    await session.execute(
        insert(TaskEvent),
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
