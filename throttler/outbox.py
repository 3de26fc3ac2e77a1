"""The outbox: accept a task durably, and let relays claim and release it.

Repository functions take a session inside the caller's transaction and never commit.

A relay hands tasks to ARQ in two steps so that a crash at any point loses nothing and
runs nothing twice:

1. One transaction: ``select_claimable`` locks unleased rows (accounts in turn), the
   in-flight caps and the throttle admit what they allow, and ``lease_scheduled``
   leases those to the relay, marks their tasks ``queued`` and writes the ``queued``
   events. The rows stay, leased to this relay.
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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, and_, bindparam, delete, false, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.constants import CLAIM_LOCK_KEY, DEFAULT_PRIORITY
from throttler.limits import LimitKey, Scope
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
    """Insert a pending task, its outbox row and its ``submitted`` event.

    Returns the task as a detached object (not in the session): Core inserts skip the
    ORM's unit of work, which costs more than the three statements themselves.
    """
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
    await session.execute(
        insert(Task).values(
            {column.key: getattr(task, column.key) for column in Task.__table__.columns}
        )
    )
    await session.execute(insert(OutboxEntry).values(task_id=task.id, created_at=now))
    await session.execute(
        insert(TaskEvent).values(
            task_id=task.id, at=now, event=EventKind.SUBMITTED, detail={"account": account}
        )
    )
    return task


@dataclass(frozen=True, kw_only=True, slots=True)
class NewTask:
    """A validated submission, ready to insert: ``submit_tasks`` writes many in one go."""

    name: str
    account: str
    payload: Mapping[str, Any]
    created_at: datetime
    priority: int = DEFAULT_PRIORITY
    host: str | None = None
    run_at: datetime | None = None
    task_id: str = field(default_factory=new_task_id)


async def submit_tasks(session: AsyncSession, tasks: Sequence[NewTask]) -> None:
    """Insert pending tasks with their outbox rows and ``submitted`` events.

    Three statements however many tasks (one executemany per table), on the Core tables:
    neither ORM objects nor the ORM's bulk path, which cost more than the inserts. The
    caller's transaction makes them all visible at once or not at all.
    """
    if not tasks:
        return
    await session.execute(
        insert(_TASKS),
        [
            {
                "id": task.task_id,
                "name": task.name,
                "account": task.account,
                "payload": dict(task.payload),
                "host": task.host,
                "status": TaskStatus.PENDING,
                "priority": task.priority,
                "attempts": 0,
                "created_at": task.created_at,
                "run_at": task.run_at,
            }
            for task in tasks
        ],
    )
    await session.execute(
        insert(_OUTBOX),
        [{"task_id": task.task_id, "created_at": task.created_at} for task in tasks],
    )
    await session.execute(
        insert(_EVENTS),
        [
            {
                "task_id": task.task_id,
                "at": task.created_at,
                "event": EventKind.SUBMITTED,
                "detail": {"account": task.account},
            }
            for task in tasks
        ],
    )


_TASKS = cast(Table, Task.__table__)
_OUTBOX = cast(Table, OutboxEntry.__table__)
_EVENTS = cast(Table, TaskEvent.__table__)


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimedTask:
    """An outbox row a relay may lease, with what it needs to enqueue the task."""

    outbox_id: int
    task_id: str
    name: str
    account: str
    payload: dict[str, Any]
    status: TaskStatus
    host: str | None = None
    run_at: datetime | None = None

    @property
    def needs_enqueue(self) -> bool:
        # False when the task already started or finished (a lease recovered after a
        # crash): its row is only released, never enqueued again.
        return self.status in (TaskStatus.PENDING, TaskStatus.QUEUED)


@dataclass(frozen=True, kw_only=True, slots=True)
class Exclusions:
    """Keys whose pending tasks a claim leaves alone: out of tokens or at their cap."""

    everything: bool = False  # the cluster itself is blocked
    names: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()

    @classmethod
    def of(cls, keys: Iterable[LimitKey]) -> Exclusions:
        by_scope: dict[Scope, set[str]] = {scope: set() for scope in Scope}
        everything = False
        for key in keys:
            if key.scope is Scope.CLUSTER:
                everything = True
            elif key.value is not None:
                by_scope[key.scope].add(key.value)
        return cls(
            everything=everything,
            names=frozenset(by_scope[Scope.TASK]),
            accounts=frozenset(by_scope[Scope.ACCOUNT]),
            hosts=frozenset(by_scope[Scope.HOST]),
        )


async def select_claimable(
    session: AsyncSession,
    *,
    limit: int,
    now: datetime,
    due_by: datetime | None = None,
    excluding: Exclusions | None = None,
) -> list[ClaimedTask]:
    """Lock up to ``limit`` unleased (or lease-expired) outbox rows, taking accounts in turn.

    Each account's rows are ranked by priority (higher first), then age; rows are taken
    by rank, so one account's backlog never holds back another's next task. Pending tasks
    not due by ``due_by`` (``tasks.run_at``) or under an excluded key are left alone;
    rows of tasks already queued or finished (recovered leases) are always taken.

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets concurrent relays take disjoint rows;
    on SQLite the transaction itself holds the database's write lock (``BEGIN IMMEDIATE``).
    """
    if limit <= 0:
        return []
    excluding = excluding or Exclusions()
    pending_filters = []
    if due_by is not None:
        pending_filters.append(or_(Task.run_at.is_(None), Task.run_at <= due_by))
    if excluding.everything:
        pending_filters.append(false())
    if excluding.names:
        pending_filters.append(Task.name.not_in(sorted(excluding.names)))
    if excluding.accounts:
        pending_filters.append(Task.account.not_in(sorted(excluding.accounts)))
    if excluding.hosts:
        pending_filters.append(or_(Task.host.is_(None), Task.host.not_in(sorted(excluding.hosts))))
    unleased = or_(OutboxEntry.claimed_until.is_(None), OutboxEntry.claimed_until < now)
    ranked_query = (
        select(
            OutboxEntry.id.label("outbox_id"),
            func.row_number()
            .over(partition_by=Task.account, order_by=(Task.priority.desc(), OutboxEntry.id))
            .label("turn"),
        )
        .join(Task, Task.id == OutboxEntry.task_id)
        .where(unleased)
    )
    if pending_filters:
        ranked_query = ranked_query.where(
            or_(Task.status != TaskStatus.PENDING, and_(*pending_filters))
        )
    ranked = ranked_query.subquery("ranked")
    rows = (
        await session.execute(
            select(
                OutboxEntry.id,
                Task.id,
                Task.name,
                Task.account,
                Task.payload,
                Task.status,
                Task.host,
                Task.run_at,
            )
            .join(ranked, ranked.c.outbox_id == OutboxEntry.id)
            .join(Task, Task.id == OutboxEntry.task_id)
            # Again on the locked row itself: PostgreSQL re-checks this against a row that
            # another relay leased meanwhile (the ranked subquery is not re-evaluated).
            .where(ranked.c.turn <= limit, unleased)
            .order_by(ranked.c.turn, OutboxEntry.id)
            .limit(limit)
            # The task row too: a worker finishing the task (or a reconciler requeueing
            # it) meanwhile either holds it, and the row is skipped this time, or waits
            # for this claim; the status read here is the one the lease acts on.
            .with_for_update(of=(OutboxEntry, Task), skip_locked=True)
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
            host=host,
            run_at=run_at,
        )
        for outbox_id, task_id, name, account, payload, status, host, run_at in rows
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
