"""The claim policy: which outbox rows a relay takes next, accounts in turn.

Each account's pending tasks are ranked by priority (higher first), then age
(``created_at``, then outbox order); rows are taken by rank, so one account's backlog
never holds back another's next task. The cost is bounded by the batch, not by the
backlog: accounts are found by a loose scan of the partial index
``ix_tasks_pending_turn`` (one index seek per account with pending tasks), and each
account's first ``limit`` tasks are read from that index in rank order. Only the rows
finally chosen are locked.

Rows of tasks that are no longer pending come from two cheap places: leases that lapsed
(a relay died before releasing; ``ix_outbox_claimed_until``) and, on request, a sweep of
the unleased rows for tasks a worker moved on meanwhile (a recovered task whose old ARQ
job ran after all). Both are taken ahead of fresh work; they need no queue turn.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    false,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnClause

from throttler.limits import LimitKey, Scope
from throttler.models import OutboxEntry, Task
from throttler.statuses import TaskStatus

# Written into the SQL as a literal, not a bound parameter: only then may SQLite and
# PostgreSQL's generic plans use the partial index (its WHERE must be implied).
_PENDING: ColumnClause[str] = literal_column(f"'{TaskStatus.PENDING.value}'")
# Per-account reads in one UNION ALL statement (SQLite allows 500 compound terms).
_ACCOUNTS_PER_STATEMENT = 200


@dataclass(frozen=True, kw_only=True, slots=True)
class ClaimedTask:
    """An outbox row a relay may lease, with what it needs to enqueue the task.

    No payload: the worker reads it from the database, and decoding it for every claimed
    row would cost the relay more than the rest of the row.
    """

    outbox_id: int
    task_id: str
    name: str
    account: str
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
    recover_lapsed: bool = True,
    sweep_strays: bool = True,
) -> list[ClaimedTask]:
    """Lock up to ``limit`` claimable outbox rows: recovered leases first, then accounts in turn.

    Pending tasks not due by ``due_by`` (``tasks.run_at``) or under an excluded key are
    left alone; rows of tasks already queued or finished are always taken.
    ``recover_lapsed`` takes rows whose lease lapsed (a cheap index range, yet one more
    statement: a relay asks about once a second, since leases last many seconds);
    ``sweep_strays`` also looks for unleased rows whose task is no longer pending (a
    scan of the whole outbox: a relay asks now and then, not on every claim).

    On PostgreSQL ``FOR UPDATE SKIP LOCKED`` lets concurrent relays take disjoint rows;
    on SQLite the transaction itself holds the database's write lock (``BEGIN IMMEDIATE``).
    """
    if limit <= 0:
        return []
    excluding = excluding or Exclusions()
    filters = _pending_filters(due_by=due_by, excluding=excluding)
    claims: list[ClaimedTask] = []
    if recover_lapsed:
        claims += await _locked(
            session,
            # Lapsed leases: their tasks are queued (or moved on), rarely still pending.
            and_(
                OutboxEntry.claimed_until < now,
                or_(Task.status != TaskStatus.PENDING, and_(true(), *filters)),
            ),
            # Not by id: SQLite would then walk the whole outbox in id order.
            order_by=OutboxEntry.claimed_until,
            limit=limit,
        )
    if sweep_strays and len(claims) < limit:
        claims += await _locked(
            session,
            and_(OutboxEntry.claimed_until.is_(None), Task.status != TaskStatus.PENDING),
            order_by=OutboxEntry.id,
            limit=limit - len(claims),
        )
    if len(claims) < limit and not excluding.everything:
        claims += await _pending_in_turn(
            session, limit=limit - len(claims), filters=filters, excluding=excluding
        )
    return claims


def _pending_filters(
    *, due_by: datetime | None, excluding: Exclusions
) -> list[ColumnElement[bool]]:
    filters: list[ColumnElement[bool]] = []
    if due_by is not None:
        filters.append(or_(Task.run_at.is_(None), Task.run_at <= due_by))
    if excluding.everything:
        filters.append(false())
    if excluding.names:
        filters.append(Task.name.not_in(sorted(excluding.names)))
    if excluding.accounts:
        filters.append(Task.account.not_in(sorted(excluding.accounts)))
    if excluding.hosts:
        filters.append(or_(Task.host.is_(None), Task.host.not_in(sorted(excluding.hosts))))
    return filters


# What a claim reads of each row; only what enqueueing and the limits need.
_CLAIMED_ROWS = select(
    OutboxEntry.id,
    Task.id,
    Task.name,
    Task.account,
    Task.status,
    Task.host,
    Task.run_at,
    Task.priority,
    Task.created_at,
).join(Task, Task.id == OutboxEntry.task_id)


async def _locked(
    session: AsyncSession,
    condition: ColumnElement[bool],
    *,
    order_by: Any,
    limit: int,
) -> list[ClaimedTask]:
    rows = (
        await session.execute(
            _CLAIMED_ROWS.where(condition)
            .order_by(order_by)
            .limit(limit)
            # The task row too: a worker finishing the task (or a reconciler requeueing
            # it) meanwhile either holds it, and the row is skipped this time, or waits
            # for this claim; the status read here is the one the lease acts on.
            .with_for_update(of=(OutboxEntry, Task), skip_locked=True)
        )
    ).all()
    return [_claimed(row) for row in rows]


def _claimed(row: Any) -> ClaimedTask:
    outbox_id, task_id, name, account, status, host, run_at = row[:7]
    return ClaimedTask(
        outbox_id=outbox_id,
        task_id=task_id,
        name=name,
        account=account,
        status=TaskStatus(status),
        host=host,
        run_at=run_at,
    )


# A loose index scan of ix_tasks_pending_turn: one index seek per distinct account.
# Written as text for SQLite's INDEXED BY (SQLAlchemy renders no SQLite hints): without
# ANALYZE statistics SQLite picks the (status, ...) indexes for the equality on status
# and sorts every pending task instead.
_PENDING_ACCOUNTS = """
WITH RECURSIVE accounts(account) AS (
  SELECT (SELECT t.account FROM tasks AS t {hint}
          WHERE t.status = 'pending' ORDER BY t.account LIMIT 1)
  UNION ALL
  SELECT (SELECT t.account FROM tasks AS t {hint}
          WHERE t.status = 'pending' AND t.account > accounts.account
          ORDER BY t.account LIMIT 1)
  FROM accounts WHERE accounts.account IS NOT NULL
)
SELECT account FROM accounts WHERE account IS NOT NULL
"""


async def any_pending(session: AsyncSession) -> bool:
    """Whether any task is pending (one seek in ``ix_tasks_pending_turn``)."""
    found = await session.scalar(select(Task.id).where(Task.status == _PENDING).limit(1))
    return found is not None


async def pending_accounts(session: AsyncSession) -> list[str]:
    """Every account with a pending task, in order: one index seek per account."""
    sqlite = session.get_bind().dialect.name == "sqlite"
    statement = _PENDING_ACCOUNTS.format(hint="INDEXED BY ix_tasks_pending_turn" if sqlite else "")
    return list((await session.execute(text(statement))).scalars())


async def _pending_in_turn(
    session: AsyncSession,
    *,
    limit: int,
    filters: Sequence[ColumnElement[bool]],
    excluding: Exclusions,
) -> list[ClaimedTask]:
    """Lock up to ``limit`` unleased rows of pending tasks, taking accounts in turn.

    On SQLite the claim's transaction already holds the write lock, so the rows read in
    rank order are the claim; PostgreSQL then locks the chosen ones (SKIP LOCKED) and
    takes what it got.
    """
    accounts = [a for a in await pending_accounts(session) if a not in excluding.accounts]
    sqlite = session.get_bind().dialect.name == "sqlite"
    ranked: list[tuple[int, datetime, Any]] = []
    if not sqlite:
        # PostgreSQL underestimates one account's pending tasks (account and status are
        # correlated), then reads them all by bitmap and sorts: 27 ms at 60,000 pending
        # against 0.06 ms for the ordered scan of the index that stops at the limit.
        await session.execute(text("SET LOCAL enable_bitmapscan = off"))
    for start in range(0, len(accounts), _ACCOUNTS_PER_STATEMENT):
        statement = _first_of_each(
            accounts[start : start + _ACCOUNTS_PER_STATEMENT],
            limit=limit,
            filters=filters,
            whole_rows=sqlite,
        )
        of_account: dict[str, list[Any]] = defaultdict(list)
        for row in await session.execute(statement):
            of_account[row[-3]].append(row)
        for rows in of_account.values():
            rows.sort(key=lambda row: (-row[-2], row[-1]))
            ranked += [(turn, row[-1], row) for turn, row in enumerate(rows)]
    if not sqlite:
        await session.execute(text("SET LOCAL enable_bitmapscan = on"))
    ranked.sort(key=lambda item: item[:2])
    chosen = [row for _, _, row in ranked[:limit]]
    if not chosen:
        return []
    if not sqlite:
        chosen = list(
            (
                await session.execute(
                    _CLAIMED_ROWS.where(
                        Task.id.in_([row[0] for row in chosen]),
                        # Again on the locked rows: PostgreSQL re-checks these against a
                        # row another relay leased, or a task that moved on, meanwhile.
                        # Wrapped (neither is ever NULL) so that the planner keeps to the
                        # primary key: an index on either would walk the whole backlog.
                        func.coalesce(Task.status, "") == TaskStatus.PENDING,
                        func.coalesce(OutboxEntry.claimed_by, "") == "",
                    ).with_for_update(of=(OutboxEntry, Task), skip_locked=True)
                )
            ).all()
        )
    # The final order, exact within ties of created_at: turns by (priority, age, outbox
    # order) within each account, then across accounts by (turn, age, outbox order).
    by_account: dict[str, list[Any]] = defaultdict(list)
    for row in chosen:
        by_account[row[3]].append(row)
    keyed: list[tuple[int, datetime, int, Any]] = []
    for account_rows in by_account.values():
        account_rows.sort(key=lambda row: (-row[7], row[8], row[0]))
        keyed += [(turn, row[8], row[0], row) for turn, row in enumerate(account_rows)]
    keyed.sort(key=lambda item: item[:3])
    return [_claimed(row) for *_, row in keyed]


def _first_of_each(
    accounts: Sequence[str],
    *,
    limit: int,
    filters: Sequence[ColumnElement[bool]],
    whole_rows: bool,
) -> Any:
    """Each account's first ``limit`` pending tasks in rank order, straight from the index.

    Every row ends with (account, priority, created_at); ``whole_rows`` reads the row
    (``_CLAIMED_ROWS``) of each, unleased ones only, else just the task id.
    """
    parts = []
    for account in accounts:
        query: Any = (
            _CLAIMED_ROWS.where(OutboxEntry.claimed_by.is_(None)) if whole_rows else select(Task.id)
        )
        part = (
            query.add_columns(
                Task.account.label("turn_account"),
                Task.priority.label("turn_priority"),
                Task.created_at.label("age"),
            )
            .where(Task.status == _PENDING, Task.account == account, *filters)
            .order_by(Task.priority.desc(), Task.created_at)
            .limit(limit)
            .subquery()
        )
        # Wrapped in a subquery each: SQLite allows no LIMIT on a compound's terms.
        parts.append(select(*part.c))
    return parts[0] if len(parts) == 1 else union_all(*parts)
