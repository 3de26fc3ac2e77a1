"""The relay's side of the store: claim outbox rows, lease them, release them.

A relay hands tasks to ARQ in two steps so that a crash at any point loses nothing and
runs nothing twice:

1. One claim transaction (``Outbox.claiming()``): ``select_claimable`` locks unleased rows
   (accounts in turn), the in-flight caps and the throttle admit what they allow, and
   ``lease`` leases those to the relay, marks their tasks ``queued`` and writes the
   ``queued`` events. The rows stay, leased to this relay.
2. The relay enqueues each task into ARQ, the job id naming the task and this dispatch
   (``throttler.job_ids``: its ``queued_at``, written by the lease).
3. ``release`` (in a later transaction): delete the leased rows.

A relay that dies between 1 and 3 leaves leased rows behind; once the lease lapses
another relay (or the same one restarted) claims them again. Their tasks are already
``queued``, so no second event is written and ``queued_at`` stays: the repeat enqueue has
the same job id, a no-op because ARQ refuses a job id whose job or result key still
exists. A task that meanwhile started or finished is not enqueued again at all: its row
is only deleted.

The claim policy: each account's pending tasks are ranked by priority (higher first),
then age (``created_at``, then outbox order); rows are taken by rank, so one account's
backlog never holds back another's next task. The cost is bounded by the batch, not by
the backlog: accounts are found by a loose scan of the partial index
``ix_tasks_pending_turn`` (one index seek per account with pending tasks), and each
account's first ``limit`` tasks are read from that index in rank order. Only the rows
finally chosen are locked. Rows of tasks that are no longer pending come from two cheap
places: leases that lapsed (a relay died before releasing; ``ix_outbox_claimed_until``)
and, on request, a sweep of the unleased rows for tasks a worker moved on meanwhile (a
recovered task whose old ARQ job ran after all). Both are taken ahead of fresh work.

``CoreOutbox`` is the reference, portable SQLAlchemy Core; the dialects' fast paths
override single methods of its unit of work (``sqlite_outbox``, ``postgres_outbox``).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, ClassVar, Literal, Protocol, cast

from sqlalchemy import (
    BindParameter,
    Column,
    ColumnElement,
    Delete,
    Insert,
    Select,
    Table,
    and_,
    bindparam,
    delete,
    exists,
    false,
    func,
    insert,
    literal_column,
    or_,
    select,
    text,
    true,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import ColumnClause

from throttler.db import SessionFactory, create_read_session_factory, create_session_factory
from throttler.limits import EACH, LimitKey, Scope, is_each_value
from throttler.models import OutboxEntry, Task, TaskEvent, TaskLabel
from throttler.settings import Settings
from throttler.statuses import INFLIGHT_STATUSES, EventKind, TaskStatus
from throttler.store.limits import VERSION as LIMITS_VERSION
from throttler.store.limits import Overrides, read_overrides

# Written into the SQL as a literal, not a bound parameter: only then may SQLite and
# PostgreSQL's generic plans use the partial index (its WHERE must be implied).
PENDING: ColumnClause[str] = literal_column(f"'{TaskStatus.PENDING.value}'")
# Per-account reads in one UNION ALL statement (SQLite allows 500 compound terms).
_ACCOUNTS_PER_STATEMENT = 200
_TASKS = cast(Table, Task.__table__)
_EVENTS = cast(Table, TaskEvent.__table__)
_OUTBOX = cast(Table, OutboxEntry.__table__)
_INFLIGHT = sorted(status.value for status in INFLIGHT_STATUSES)
_ENQUEUEABLE = frozenset((TaskStatus.PENDING, TaskStatus.QUEUED))
# A status as read to TaskStatus: a dict look-up, a quarter of the enum's own call.
_STATUSES = {status.value: status for status in TaskStatus}
_SCOPE_COLUMNS = {Scope.TASK: Task.name, Scope.ACCOUNT: Task.account, Scope.HOST: Task.host}


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
    # When the relay released the task (``queued`` only): names its dispatch.
    queued_at: datetime | None = None
    # The task's labels (tasks.labels, sorted), for key: rules; () when it has none.
    labels: tuple[str, ...] = ()

    @property
    def needs_enqueue(self) -> bool:
        # False when the task already started or finished (a lease recovered after a
        # crash): its row is only released, never enqueued again.
        return self.status in _ENQUEUEABLE


@dataclass(frozen=True, kw_only=True, slots=True)
class Exclusions:
    """Keys whose pending tasks a claim leaves alone: out of tokens or at their cap."""

    everything: bool = False  # the cluster itself is blocked
    names: frozenset[str] = frozenset()
    accounts: frozenset[str] = frozenset()
    hosts: frozenset[str] = frozenset()
    labels: frozenset[str] = frozenset()  # key: keys (prefix:value)

    @classmethod
    def of(cls, keys: Iterable[LimitKey]) -> Exclusions:
        by_scope: dict[Scope, set[str]] = {scope: set() for scope in Scope}
        everything = False
        for key in keys:
            if key.scope is Scope.CLUSTER:
                everything = True
            elif key.value == EACH and key.scope is not Scope.HOST:
                # Every value of a scope every task has (a paused task:* or account:*).
                everything = True
            elif key.value is not None:
                by_scope[key.scope].add(key.value)
        return cls(
            everything=everything,
            names=frozenset(by_scope[Scope.TASK]),
            accounts=frozenset(by_scope[Scope.ACCOUNT]),
            hosts=frozenset(by_scope[Scope.HOST]),
            labels=frozenset(by_scope[Scope.KEY]),
        )


# Not frozen: built for every row a claim reads and used only inside this module, and a
# frozen dataclass's __init__ costs twice as much (object.__setattr__ per field).
@dataclass(kw_only=True, slots=True)
class RankedRow:
    """A pending task's place in its account's turn: what the claim order sorts by."""

    task_id: str
    account: str
    priority: int
    created_at: datetime
    outbox_id: int = 0
    claim: ClaimedTask | None = None  # the whole row, when it was read with the rank


class OutboxClaim(Protocol):
    """The reads and writes of one claim transaction (``Outbox.claiming()``)."""

    async def serialize(self) -> None:
        """Make concurrent claim transactions take turns until they commit."""

    async def limits_version(self) -> int:
        """``max(limit_changes.id)``: moves with every limit change (throttler.store.limits)."""

    async def limit_overrides(self) -> Overrides:
        """Every rule and pause set through the API, with the version read."""

    async def last_dispatch_at(self) -> datetime | None:
        """The latest ``queued_at`` of any task (the limiter's drain floor, after a loss)."""

    async def release(self, *, relay_id: str, outbox_ids: Sequence[int]) -> None:
        """Delete outbox rows this relay has handed to ARQ (or needed no enqueue)."""

    async def count_inflight_by_key(self, *, scopes: Iterable[Scope]) -> dict[LimitKey, int]:
        """Count in-flight tasks per key of the given scopes (the cluster as one key)."""

    async def count_leased(self, *, now: datetime) -> int:
        """Count outbox rows leased to a live relay: admitted, maybe not yet in ARQ."""

    async def count_rows(self) -> int:
        """Count rows still in the outbox (leased or not)."""

    async def pending_accounts(self) -> list[str]:
        """Every account with a pending task, in order."""

    async def select_claimable(
        self,
        *,
        limit: int,
        now: datetime,
        due_by: datetime | None = None,
        excluding: Exclusions | None = None,
        recover_lapsed: bool = True,
        sweep_strays: bool = True,
    ) -> list[ClaimedTask]:
        """Lock up to ``limit`` claimable rows: recovered leases first, then accounts in turn."""

    async def lease(
        self,
        *,
        claims: Sequence[ClaimedTask],
        queued_at: Sequence[datetime],
        relay_id: str,
        lease_s: float,
    ) -> None:
        """Lease rows to this relay; mark each pending task ``queued`` at its own moment."""

    async def retime(
        self,
        *,
        claims: Sequence[ClaimedTask],
        queued_at: Sequence[datetime],
        relay_id: str,
        lease_s: float,
    ) -> set[int]:
        """Give queued tasks new moments, where their rows are still leased to this relay.

        Returns the outbox ids it moved: only those may be enqueued at the new moments.
        """

    async def mark_queued(self, *, task_ids: Sequence[str], relay_id: str, now: datetime) -> None:
        """Move pending tasks to ``queued`` and record one ``queued`` event each."""


class Outbox(Protocol):
    """The relay's store: claim transactions, and the looks a relay takes outside them."""

    def claiming(self) -> AbstractAsyncContextManager[OutboxClaim]:
        """``async with outbox.claiming() as claim:`` one claim transaction, committed on exit."""

    def claim_in(self, session: AsyncSession) -> OutboxClaim:
        """The claim operations inside a transaction the caller holds (and commits)."""

    async def surely_idle(self) -> bool:
        """Whether a read-only look, cheaper than a claim here, found no pending task."""

    async def count_rows(self) -> int:
        """Count rows still in the outbox (leased or not), in a read of its own."""


# What a claim reads of each row; only what enqueueing and the limits need.
CLAIMED_ROWS = select(
    OutboxEntry.id.label("outbox_id"),
    Task.id.label("task_id"),
    Task.name,
    Task.account,
    Task.status,
    Task.host,
    Task.run_at,
    Task.queued_at,
    Task.priority,
    Task.created_at,
    # The JSON copy on the task: key: rules need a claimed task's labels with no query more.
    Task.labels,
).join(Task, Task.id == OutboxEntry.task_id)
# In-flight tasks per label (``count_inflight_by_key``); public for the EXPLAIN test.
INFLIGHT_BY_LABEL = (
    select(TaskLabel.label, func.count())
    .select_from(Task)
    .join(TaskLabel, TaskLabel.task_id == Task.id)
    .where(Task.status.in_(_INFLIGHT), Task.labels.is_not(None))
    .group_by(TaskLabel.label)
)
# An unleased pending task's rank in its account's turn, without the rest of its row. A
# leased one (its enqueue under way) is not a candidate, so it takes no account's turn.
RANKED_IDS = (
    select(Task.id.label("task_id"), Task.account, Task.priority, Task.created_at)
    .join(OutboxEntry, OutboxEntry.task_id == Task.id)
    .where(OutboxEntry.claimed_by.is_(None))
)

# A loose index scan of ix_tasks_pending_turn: one index seek per distinct account.
# Text, so that a dialect may add its index hint where ``{hint}`` stands.
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


def _claimed(
    outbox_id: int,
    task_id: str,
    name: str,
    account: str,
    status: str,
    host: str | None,
    run_at: datetime | None,
    queued_at: datetime | None,
    priority: int,
    created_at: datetime,
    labels: list[str] | None,
) -> ClaimedTask:
    """A row of ``CLAIMED_ROWS``, its columns bound to these names (checked below).

    Spread into parameters (``_claimed(*row)``), not read by attribute: reading a
    SQLAlchemy row by label costs about a microsecond a column, 10 % of the relay's time.
    """
    return ClaimedTask(
        outbox_id=outbox_id,
        task_id=task_id,
        name=name,
        account=account,
        status=_STATUSES[status],
        host=host,
        run_at=run_at,
        queued_at=queued_at,
        labels=tuple(labels) if labels else (),
    )


def ranked_claim(
    outbox_id: int,
    task_id: str,
    name: str,
    account: str,
    status: str,
    host: str | None,
    run_at: datetime | None,
    queued_at: datetime | None,
    priority: int,
    created_at: datetime,
    labels: list[str] | None,
) -> RankedRow:
    """A row of ``CLAIMED_ROWS`` with its rank."""
    claim = _claimed(
        outbox_id,
        task_id,
        name,
        account,
        status,
        host,
        run_at,
        queued_at,
        priority,
        created_at,
        labels,
    )
    return RankedRow(
        task_id=task_id,
        account=account,
        priority=priority,
        created_at=created_at,
        outbox_id=outbox_id,
        claim=claim,
    )


def ranked_id(task_id: str, account: str, priority: int, created_at: datetime) -> RankedRow:
    """A row of ``RANKED_IDS``."""
    return RankedRow(task_id=task_id, account=account, priority=priority, created_at=created_at)


def _check_bound_by_name(
    convert: Callable[..., object], statement: Select[*tuple[Any, ...]]
) -> None:
    """Make sure rows spread into ``convert`` land on the parameters named like their columns."""
    columns = list(statement.selected_columns.keys())
    if list(inspect.signature(convert).parameters) != columns:
        raise RuntimeError(f"{convert.__name__} does not take the columns {columns}")


def _columns(row: Any) -> tuple[Any, ...]:
    """A row of ``CLAIMED_ROWS`` to spread: past nine columns SQLAlchemy's typing of a row
    ends in ``*tuple[Any, ...]``, which no fixed signature takes (names checked below)."""
    return cast(tuple[Any, ...], row)


_check_bound_by_name(_claimed, CLAIMED_ROWS)
_check_bound_by_name(ranked_claim, CLAIMED_ROWS)
_check_bound_by_name(ranked_id, RANKED_IDS)


def _in_turns(rows: Iterable[RankedRow]) -> list[RankedRow]:
    """Order rows by turn: each account's by (priority, age, outbox order), then across
    accounts by (turn, age, outbox order)."""
    by_account: dict[str, list[RankedRow]] = defaultdict(list)
    for row in rows:
        by_account[row.account].append(row)
    keyed: list[tuple[int, datetime, int, RankedRow]] = []
    for account_rows in by_account.values():
        account_rows.sort(key=lambda r: (-r.priority, r.created_at, r.outbox_id))
        keyed += [(turn, r.created_at, r.outbox_id, r) for turn, r in enumerate(account_rows)]
    keyed.sort(key=lambda item: item[:3])
    return [row for *_, row in keyed]


IdsAmong = Callable[[Column[Any], str], ColumnElement[bool]]
LeaseStatement = Literal["release", "lease", "queue_all", "queue_each", "insert_event"]
Values = dict[str, Any]


def ids_in_list(column: Column[Any], name: str) -> ColumnElement[bool]:
    """``column IN (the ids)``: the reference's form, one placeholder per id."""
    return column.in_(bindparam(name, expanding=True))


def _still(status: TaskStatus) -> ColumnElement[bool]:
    """The task still has ``status``: checked on each row found by its primary key.

    Wrapped (a status is never NULL) so that no planner takes the status indexes instead:
    SQLite then read every pending task through ix_tasks_status_name and passed each
    through the batch's ids, 43 ms a claim of 1,000 with 50,000 pending, against ~10 ms
    by key (tests/integration/store/test_outbox_plans.py).
    """
    return func.coalesce(_TASKS.c.status, "") == status


def _bind(column: Column[Any], name: str) -> BindParameter[Any]:
    return bindparam(name, value=None, type_=column.type)


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaseStatements:
    """The statements that lease a claim's rows and release them, built around ``among``:
    how a statement names a batch of ids (the reference's list, a dialect's one array)."""

    release: Delete
    lease: Update
    # Pending tasks to ``queued``: all at one moment (unthrottled), or each at its own.
    queue_all: Update
    queue_each: Update
    insert_event: Insert

    @classmethod
    def build(cls, among: IdsAmong = ids_in_list) -> LeaseStatements:
        outbox, tasks, events = _OUTBOX.c, _TASKS.c, _EVENTS.c
        # Names of their own: a bind named like a column it sets is reserved in an UPDATE.
        queued = {"status": TaskStatus.QUEUED, "queued_at": _bind(tasks.queued_at, "moment")}
        return cls(
            release=delete(_OUTBOX).where(
                among(outbox.id, "outbox_ids"),
                outbox.claimed_by == _bind(outbox.claimed_by, "relay_id"),
            ),
            lease=update(_OUTBOX)
            .where(among(outbox.id, "outbox_ids"))
            .values(
                claimed_by=_bind(outbox.claimed_by, "relay_id"),
                claimed_until=_bind(outbox.claimed_until, "lease_until"),
            ),
            queue_all=update(_TASKS)
            .where(among(tasks.id, "task_ids"), _still(TaskStatus.PENDING))
            .values(queued),
            queue_each=update(_TASKS)
            .where(tasks.id == _bind(tasks.id, "task_key"), _still(TaskStatus.PENDING))
            .values(queued),
            # inline: no RETURNING of the new ids, which an executemany would only discard.
            insert_event=insert(_EVENTS)
            .values(
                {name: _bind(events[name], name) for name in ("task_id", "at", "event", "detail")}
            )
            .inline(),
        )


_LEASE_STATEMENTS = LeaseStatements.build()


@dataclass(frozen=True, kw_only=True, slots=True)
class LeaseWrites:
    """What leasing a claim writes: the rows' lease, and each pending task's moment."""

    outbox_ids: list[int]
    relay_id: str
    lease_until: datetime
    # The claimed tasks still pending (a re-claimed queued task keeps its own moment).
    task_ids: list[str]
    queued_at: list[datetime]
    # The moment every one of them goes at, when they share one.
    moment: datetime | None

    @classmethod
    def of(
        cls,
        claims: Sequence[ClaimedTask],
        *,
        queued_at: Sequence[datetime],
        relay_id: str,
        lease_s: float,
    ) -> LeaseWrites:
        pending = [
            (claim.task_id, at)
            for claim, at in zip(claims, queued_at, strict=True)
            if claim.status is TaskStatus.PENDING
        ]
        moments = {at for _, at in pending}
        return cls(
            outbox_ids=[claim.outbox_id for claim in claims],
            relay_id=relay_id,
            lease_until=max(queued_at) + timedelta(seconds=lease_s),
            task_ids=[task_id for task_id, _ in pending],
            queued_at=[at for _, at in pending],
            moment=next(iter(moments)) if len(moments) == 1 else None,
        )

    def lease_values(self) -> dict[str, Any]:
        return {
            "outbox_ids": self.outbox_ids,
            "relay_id": self.relay_id,
            "lease_until": self.lease_until,
        }

    def queue_all_values(self) -> dict[str, Any]:
        return {"task_ids": self.task_ids, "moment": self.moment}

    def queue_each_rows(self) -> list[dict[str, Any]]:
        return [
            {"task_key": task_id, "moment": at}
            for task_id, at in zip(self.task_ids, self.queued_at, strict=True)
        ]

    def detail(self) -> dict[str, Any]:
        """The ``queued`` events' detail: which relay queued the task."""
        return {"relay": self.relay_id}

    def event_rows(self) -> list[dict[str, Any]]:
        detail = self.detail()
        return [
            {"task_id": task_id, "at": at, "event": EventKind.QUEUED, "detail": detail}
            for task_id, at in zip(self.task_ids, self.queued_at, strict=True)
        ]


class CoreClaim:
    """The reference claim transaction: portable SQLAlchemy Core, no hints."""

    # Whether the transaction already excludes every other writer (SQLite's BEGIN
    # IMMEDIATE): then rows read in rank order are the claim, with no second, locking read
    # (such a claim's ``_ranked`` returns whole rows).
    reads_are_locks: ClassVar[bool] = False
    # Text put where ``_PENDING_ACCOUNTS`` says ``{hint}``.
    accounts_hint: ClassVar[str] = ""
    # In-flight tasks per label (``count_inflight_by_key``).
    inflight_by_label: ClassVar[Select[str, int]] = INFLIGHT_BY_LABEL

    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def limits_version(self) -> int:
        return int(await self.session.scalar(LIMITS_VERSION) or 0)

    async def limit_overrides(self) -> Overrides:
        return await self.session.run_sync(lambda session: read_overrides(session.connection()))

    async def last_dispatch_at(self) -> datetime | None:
        latest: datetime | None = await self.session.scalar(select(func.max(Task.queued_at)))
        return latest

    async def serialize(self) -> None:
        """Make concurrent claim transactions take turns until they commit.

        Needed when a claim counts in-flight tasks: under READ COMMITTED two relays would
        otherwise both see the same free slots. The reference relies on the database
        running one writing transaction at a time (SQLite's ``BEGIN IMMEDIATE``); a
        database that does not overrides this with a lock of its own.
        """

    async def release(self, *, relay_id: str, outbox_ids: Sequence[int]) -> None:
        if outbox_ids:
            await self._write("release", {"outbox_ids": list(outbox_ids), "relay_id": relay_id})

    async def count_rows(self) -> int:
        query = select(func.count()).select_from(OutboxEntry)
        return int((await self.session.execute(query)).scalar_one())

    async def count_inflight_by_key(self, *, scopes: Iterable[Scope]) -> dict[LimitKey, int]:
        counts: dict[LimitKey, int] = {}
        for scope in sorted(set(scopes)):
            if scope is Scope.CLUSTER:
                query = select(func.count()).select_from(Task).where(Task.status.in_(_INFLIGHT))
                total = (await self.session.execute(query)).scalar_one()
                counts[LimitKey(scope=scope)] = int(total)
                continue
            if scope is Scope.KEY:
                counts.update(await self._count_inflight_by_label())
                continue
            column = _SCOPE_COLUMNS[scope]
            rows = await self.session.execute(
                select(column.label("value"), func.count().label("inflight"))
                .where(Task.status.in_(_INFLIGHT), column.is_not(None))
                .group_by(column)
            )
            for row in rows:
                counts[LimitKey(scope=scope, value=row.value)] = int(row.inflight)
        return counts

    def without_labels(self, labels: frozenset[str]) -> ColumnElement[bool]:
        """How this claim leaves out tasks carrying any of ``labels`` (excluded key: keys)."""
        return without_labels(labels)

    async def _count_inflight_by_label(self) -> dict[LimitKey, int]:
        """In-flight tasks per label: the in-flight tasks (ix_tasks_status_name), each
        one's labels by task_labels' primary key; unlabelled tasks are passed over.

        Every label, not only those a rule caps: the in-flight tasks are few (what the
        workers and ARQ's queue hold), and keys without a cap are never full.
        """
        rows = await self.session.execute(self.inflight_by_label)
        return {LimitKey(scope=Scope.KEY, value=label): int(count) for label, count in rows}

    async def count_leased(self, *, now: datetime) -> int:
        query = (
            select(func.count())
            .select_from(OutboxEntry)
            .where(OutboxEntry.claimed_until.is_not(None), OutboxEntry.claimed_until >= now)
        )
        return int((await self.session.execute(query)).scalar_one())

    async def select_claimable(
        self,
        *,
        limit: int,
        now: datetime,
        due_by: datetime | None = None,
        excluding: Exclusions | None = None,
        recover_lapsed: bool = True,
        sweep_strays: bool = True,
    ) -> list[ClaimedTask]:
        """Lock up to ``limit`` claimable rows: recovered leases first, then accounts in turn.

        Pending tasks not due by ``due_by`` (``tasks.run_at``) or under an excluded key
        are left alone; rows of tasks already queued or finished are always taken.
        ``recover_lapsed`` takes rows whose lease lapsed (a cheap index range, yet one more
        statement: a relay asks about once a second, since leases last many seconds);
        ``sweep_strays`` also looks for unleased rows whose task is no longer pending (a
        scan of the whole outbox: a relay asks now and then, not on every claim).
        ``FOR UPDATE SKIP LOCKED`` (where the database has it) lets concurrent relays take
        disjoint rows.
        """
        if limit <= 0:
            return []
        excluding = excluding or Exclusions()
        filters = _pending_filters(
            due_by=due_by, excluding=excluding, without_labels=self.without_labels
        )
        claims: list[ClaimedTask] = []
        if recover_lapsed:
            claims += await self._locked(
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
            claims += await self._locked(
                and_(OutboxEntry.claimed_until.is_(None), Task.status != TaskStatus.PENDING),
                order_by=OutboxEntry.id,
                limit=limit - len(claims),
            )
        if len(claims) < limit and not excluding.everything:
            claims += await self._pending_in_turn(
                limit=limit - len(claims), filters=filters, excluding=excluding
            )
        return claims

    async def _locked(
        self, condition: ColumnElement[bool], *, order_by: Any, limit: int
    ) -> list[ClaimedTask]:
        rows = await self.session.execute(
            CLAIMED_ROWS.where(condition)
            .order_by(order_by)
            .limit(limit)
            # The task row too: a worker finishing the task (or a reconciler requeueing
            # it) meanwhile either holds it, and the row is skipped this time, or waits
            # for this claim; the status read here is the one the lease acts on.
            .with_for_update(of=(OutboxEntry, Task), skip_locked=True)
        )
        return [_claimed(*_columns(row)) for row in rows]

    async def pending_accounts(self) -> list[str]:
        """Every account with a pending task, in order: one index seek per account."""
        statement = text(_PENDING_ACCOUNTS.format(hint=self.accounts_hint))
        return list((await self.session.execute(statement)).scalars())

    async def _pending_in_turn(
        self, *, limit: int, filters: Sequence[ColumnElement[bool]], excluding: Exclusions
    ) -> list[ClaimedTask]:
        """Lock up to ``limit`` unleased rows of pending tasks, taking accounts in turn."""
        accounts = [a for a in await self.pending_accounts() if a not in excluding.accounts]
        ranked = await self._deep_enough(accounts, limit=limit, filters=filters)
        chosen = _in_turns_by_rank(ranked)[:limit]
        if not chosen:
            return []
        if not self.reads_are_locks:
            chosen = await self._lock_pending(chosen)
        # The final order, exact within ties of created_at: by outbox order too.
        final = _in_turns(chosen)
        return [row.claim for row in final if row.claim is not None]

    async def _deep_enough(
        self, accounts: Sequence[str], *, limit: int, filters: Sequence[ColumnElement[bool]]
    ) -> list[RankedRow]:
        """Each account's first tasks, as deep as the first ``limit`` turns need.

        The first ``limit`` rows in turn order (``_in_turns_by_rank``) never lie deeper in
        an account than ``ceil(limit / accounts)`` while every account has that many; an
        account read to that depth in full may hold more, so only those are read deeper
        while the rows fall short of ``limit``. A claim then reads about ``limit`` rows
        plus one seek per account, not ``limit`` rows of every account (with 10,000
        accounts, the whole backlog: tens of seconds a claim). The turns chosen are the
        same as from ``limit`` rows of every account.
        """
        if not accounts:
            return []
        depth = -(-limit // len(accounts))
        by_account: dict[str, list[RankedRow]] = {}
        to_read: Sequence[str] = accounts
        while True:
            for account in to_read:
                by_account[account] = []
            for row in await self._ranked(to_read, limit=depth, filters=filters):
                by_account[row.account].append(row)
            read = sum(len(rows) for rows in by_account.values())
            cut_short = [account for account in to_read if len(by_account[account]) >= depth]
            if read >= limit or not cut_short:
                return [row for rows in by_account.values() for row in rows]
            depth += -(-(limit - read) // len(cut_short))
            to_read = cut_short

    async def _ranked(
        self, accounts: Sequence[str], *, limit: int, filters: Sequence[ColumnElement[bool]]
    ) -> list[RankedRow]:
        """Each account's first ``limit`` unleased pending tasks in rank order, in few
        statements. A claim whose ``reads_are_locks`` returns them whole (``RankedRow.claim``)."""
        ranked: list[RankedRow] = []
        for start in range(0, len(accounts), _ACCOUNTS_PER_STATEMENT):
            statement = _first_of_each(
                accounts[start : start + _ACCOUNTS_PER_STATEMENT], limit=limit, filters=filters
            )
            ranked += [ranked_id(*row) for row in await self.session.execute(statement)]
        return ranked

    async def _lock_pending(self, chosen: Sequence[RankedRow]) -> list[RankedRow]:
        """Lock the chosen rows, skipping any another relay took or whose task moved on."""
        rows = await self.session.execute(
            CLAIMED_ROWS.where(
                Task.id.in_([row.task_id for row in chosen]),
                # Again on the locked rows: PostgreSQL re-checks these against a row
                # another relay leased, or a task that moved on, meanwhile. Wrapped
                # (neither is ever NULL) so that the planner keeps to the primary key:
                # an index on either would walk the whole backlog.
                func.coalesce(Task.status, "") == TaskStatus.PENDING,
                func.coalesce(OutboxEntry.claimed_by, "") == "",
            ).with_for_update(of=(OutboxEntry, Task), skip_locked=True)
        )
        return [ranked_claim(*_columns(row)) for row in rows]

    async def lease(
        self,
        *,
        claims: Sequence[ClaimedTask],
        queued_at: Sequence[datetime],
        relay_id: str,
        lease_s: float,
    ) -> None:
        """Lease rows to this relay, giving each pending task its own ``queued_at``.

        For a relay that took tokens ahead: each task is queued at the moment its token
        falls due; the lease lasts ``lease_s`` past the latest. Three statements however
        many distinct moments there are.
        """
        if not claims:
            return
        writes = LeaseWrites.of(claims, queued_at=queued_at, relay_id=relay_id, lease_s=lease_s)
        await self._write("lease", writes.lease_values())
        if not writes.task_ids:
            return
        if writes.moment is not None:
            # Unthrottled, every task goes at the grant: one statement, not one per task.
            await self._write("queue_all", writes.queue_all_values())
        else:
            await self._write("queue_each", writes.queue_each_rows())
        await self._write_events(writes)

    async def _write_events(self, writes: LeaseWrites) -> None:
        """Record a ``queued`` event for each task the lease moved to ``queued``."""
        await self._write("insert_event", writes.event_rows())

    async def _write(self, name: LeaseStatement, values: Values | list[Values]) -> None:
        """Run the statement ``name`` of ``LeaseStatements`` once, or once per row."""
        await self.session.execute(getattr(_LEASE_STATEMENTS, name), values)

    async def retime(
        self,
        *,
        claims: Sequence[ClaimedTask],
        queued_at: Sequence[datetime],
        relay_id: str,
        lease_s: float,
    ) -> set[int]:
        """Move tasks whose jobs came late to their new moments, before they are enqueued.

        The lease stretches to the new moments, so no other relay takes the rows meanwhile;
        a row another relay took once the lease lapsed is left alone (it enqueues the task
        itself). queued_at (and the queued event's time) stays the moment the task may go,
        which the drain floor reads.
        """
        if not claims:
            return set()
        result = await self.session.execute(
            update(OutboxEntry)
            .where(
                OutboxEntry.id.in_([claim.outbox_id for claim in claims]),
                OutboxEntry.claimed_by == relay_id,
            )
            .values(claimed_until=max(queued_at) + timedelta(seconds=lease_s))
            .returning(OutboxEntry.id)
        )
        kept = set(result.scalars())
        moved = [
            {"b_task_id": claim.task_id, "b_queued_at": at}
            for claim, at in zip(claims, queued_at, strict=True)
            if claim.outbox_id in kept
        ]
        if moved:
            # The task's latest queued event says when it was queued: the same moment.
            await self.session.execute(
                update(_EVENTS)
                .where(
                    _EVENTS.c.task_id == bindparam("b_task_id"),
                    _EVENTS.c.event == EventKind.QUEUED,
                    _EVENTS.c.at
                    == select(_TASKS.c.queued_at)
                    .where(_TASKS.c.id == bindparam("b_task_id"))
                    .scalar_subquery(),
                )
                .values(at=bindparam("b_queued_at")),
                moved,
            )
            await self.session.execute(
                update(_TASKS)
                .where(_TASKS.c.id == bindparam("b_task_id"), _still(TaskStatus.QUEUED))
                .values(queued_at=bindparam("b_queued_at")),
                moved,
            )
        return kept

    async def mark_queued(self, *, task_ids: Sequence[str], relay_id: str, now: datetime) -> None:
        """Move the tasks still pending to ``queued``, with a ``queued`` event each.

        A task no longer pending (another relay queued it after taking over a lease, or it
        moved on) is left alone and gets no event: a caller working from a stale read
        writes nothing. (``lease`` marks only rows it holds locked, read in its own
        transaction.)
        """
        if not task_ids:
            return
        moved = list(
            (
                await self.session.execute(
                    update(_TASKS)
                    .where(_TASKS.c.id.in_(list(task_ids)), _still(TaskStatus.PENDING))
                    .values(status=TaskStatus.QUEUED, queued_at=now)
                    .returning(_TASKS.c.id)
                )
            ).scalars()
        )
        if moved:
            await self.session.execute(
                insert(_EVENTS),
                [
                    {
                        "task_id": task_id,
                        "at": now,
                        "event": EventKind.QUEUED,
                        "detail": {"relay": relay_id},
                    }
                    for task_id in sorted(moved, key=list(task_ids).index)
                ],
            )


def _in_turns_by_rank(ranked: Sequence[RankedRow]) -> list[RankedRow]:
    """Order candidates by (turn within their account, age); each account's own order is
    the index's (priority, age), as read."""
    by_account: dict[str, list[RankedRow]] = defaultdict(list)
    for row in ranked:
        by_account[row.account].append(row)
    keyed: list[tuple[int, datetime, RankedRow]] = []
    for rows in by_account.values():
        rows.sort(key=lambda r: (-r.priority, r.created_at))
        keyed += [(turn, r.created_at, r) for turn, r in enumerate(rows)]
    keyed.sort(key=lambda item: item[:2])
    return [row for *_, row in keyed]


def label_patterns(labels: frozenset[str]) -> tuple[list[str], list[str]]:
    """``labels`` as exact labels and prefixes: a paused ``key:<prefix>:*`` excludes
    ``<prefix>:*``, every label of that prefix (a label's value never holds ``*``)."""
    exact = sorted(label for label in labels if not is_each_value(Scope.KEY, label))
    prefixes = sorted(label[: -len(EACH)] for label in labels if is_each_value(Scope.KEY, label))
    return exact, prefixes


def without_labels(labels: frozenset[str]) -> ColumnElement[bool]:
    """A task with none of ``labels``: unlabelled ones (NULL) without a look, labelled ones
    by at most 4 seeks of task_labels' primary key (task_id, label)."""
    exact, prefixes = label_patterns(labels)
    matches: list[ColumnElement[bool]] = [TaskLabel.label.in_(exact)] if exact else []
    matches += [TaskLabel.label.startswith(prefix, autoescape=True) for prefix in prefixes]
    return or_(
        Task.labels.is_(None),
        ~exists().where(TaskLabel.task_id == Task.id, or_(*matches)),
    )


def _pending_filters(
    *,
    due_by: datetime | None,
    excluding: Exclusions,
    without_labels: Callable[[frozenset[str]], ColumnElement[bool]] = without_labels,
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
    if EACH in excluding.hosts:
        # Every host (a paused host:*): only tasks without one may go.
        filters.append(Task.host.is_(None))
    elif excluding.hosts:
        filters.append(or_(Task.host.is_(None), Task.host.not_in(sorted(excluding.hosts))))
    if excluding.labels:
        filters.append(without_labels(excluding.labels))
    return filters


def first_in_turn(
    query: Select[*tuple[Any, ...]],
    account: ColumnElement[str] | str,
    *,
    filters: Sequence[ColumnElement[bool]],
    limit: ColumnElement[int] | int,
) -> Select[*tuple[Any, ...]]:
    """``query`` (over ``RANKED_IDS``' tables) narrowed to ``account``'s pending tasks in
    rank order (higher priority first, then older), the first ``limit``: an ordered walk of
    ix_tasks_pending_turn that stops there. ``account`` may be a column of an outer array
    (the dialects' one-statement reads)."""
    return (
        query.where(Task.status == PENDING, Task.account == account, *filters)
        .order_by(Task.priority.desc(), Task.created_at)
        .limit(limit)
    )


def _first_of_each(
    accounts: Sequence[str], *, limit: int, filters: Sequence[ColumnElement[bool]]
) -> Any:
    """Rows of ``RANKED_IDS``: each account's first ``limit`` unleased pending tasks."""
    # Wrapped in a subquery each: SQLite allows no LIMIT on a compound's terms.
    parts = [
        select(*first_in_turn(RANKED_IDS, account, filters=filters, limit=limit).subquery().c)
        for account in accounts
    ]
    return parts[0] if len(parts) == 1 else union_all(*parts)


class CoreOutbox:
    """The reference outbox store, on portable SQLAlchemy Core."""

    claim_type: ClassVar[type[CoreClaim]] = CoreClaim

    def __init__(self, *, sessions: SessionFactory, read_sessions: SessionFactory) -> None:
        self.sessions = sessions
        # Sessions that only read: on SQLite they never wait for the write lock.
        self.read_sessions = read_sessions

    @asynccontextmanager
    async def claiming(self) -> AsyncIterator[CoreClaim]:
        async with self.sessions.begin() as session:
            yield self.claim_type(session)

    def claim_in(self, session: AsyncSession) -> CoreClaim:
        return self.claim_type(session)

    async def any_pending(self) -> bool:
        """Whether any task is pending (one seek in ``ix_tasks_pending_turn``), read-only."""
        async with self.read_sessions() as session:
            found = await session.scalar(select(Task.id).where(Task.status == PENDING).limit(1))
        return found is not None

    async def surely_idle(self) -> bool:
        """Whether a read-only look finds no pending task: then a relay skips its claim.

        An idle relay polls many times a second; where each claim takes the database's
        one write lock (SQLite), the API and the workers would wait for it.
        """
        return not await self.any_pending()

    async def count_rows(self) -> int:
        async with self.read_sessions() as session:
            return await self.claim_type(session).count_rows()


def open_outbox(*, settings: Settings, engine: AsyncEngine) -> CoreOutbox:
    """The outbox store for ``engine``'s database: the reference or its dialect's override."""
    sessions = create_session_factory(engine)
    read_sessions = create_read_session_factory(engine)
    if settings.is_sqlite:
        from throttler.store.sqlite_outbox import SqliteOutbox

        return SqliteOutbox(sessions=sessions, read_sessions=read_sessions)
    from throttler.store.postgres_outbox import PostgresOutbox

    return PostgresOutbox(
        sessions=sessions,
        read_sessions=read_sessions,
        idle_timeout_s=settings.database_timeout_s,
    )
