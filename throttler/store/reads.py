"""The API's reads: one task's view, a page of an account's tasks, a task's events, which
waited-on tasks are terminal, relay status counts, and whether the database would take a
write now (readiness, throttler.store.writable).

``SqlReadStore`` is the reference, in portable SQLAlchemy Core, and no dialect pays for an
override: each read is one indexed statement (the task by primary key, the sweep by
primary keys, a page of tasks a keyset range per status in an index that holds the
filter and the order, the counts one grouped statement per scope kind). Every read runs on
sessions that, on SQLite, never wait for the write lock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import (
    ColumnElement,
    Integer,
    Row,
    Select,
    and_,
    bindparam,
    case,
    func,
    literal_column,
    or_,
    select,
    text,
    true,
    tuple_,
    union_all,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import QueryableAttribute

from throttler.db import SessionFactory, create_read_session_factory
from throttler.limits import Scope
from throttler.models import Task, TaskEvent, TaskLabel
from throttler.settings import Settings
from throttler.statuses import INFLIGHT_STATUSES, TERMINAL_STATUSES, EventKind, TaskStatus
from throttler.store.writable import WriteCheck, open_write_check

# Ids per sweep statement: well under SQLite's bound-parameter limit.
TERMINAL_BATCH_SIZE = 500

_TERMINAL = sorted(status.value for status in TERMINAL_STATUSES)
_INFLIGHT = sorted(status.value for status in INFLIGHT_STATUSES)
_LIVE = [TaskStatus.PENDING.value, *_INFLIGHT]
_SCOPE_COLUMNS: dict[Scope, QueryableAttribute[Any]] = {
    Scope.TASK: Task.name,
    Scope.ACCOUNT: Task.account,
    Scope.HOST: Task.host,
    # A label's tasks: task_labels joined to tasks (``_counts_query``).
    Scope.KEY: TaskLabel.label,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskView:
    """A task as its owner sees it (the result endpoint)."""

    task_id: str
    name: str
    status: TaskStatus
    # The download's host (a host: limit's key); None for other kinds.
    host: str | None
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    priority: int
    created_at: datetime
    run_at: datetime | None
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    labels: tuple[str, ...] = ()  # sorted (throttler.labels)


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskKey:
    """A task's place in the newest-first order of an account's tasks."""

    created_at: datetime
    task_id: str


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskQuery:
    """Which of an account's tasks to list, newest first, and from where."""

    account: str
    # None: every status; else only these (a non-empty set).
    statuses: frozenset[TaskStatus] | None = None
    name: str | None = None
    # Only tasks carrying this label (throttler.labels).
    label: str | None = None
    # Both bounds exclusive.
    created_after: datetime | None = None
    created_before: datetime | None = None
    # The last task of the previous page: this page holds only tasks after it in the order.
    after: TaskKey | None = None
    limit: int = 100


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskPage:
    """Up to ``limit`` tasks newest first; ``next`` is where the next page starts, if any."""

    tasks: list[TaskView]
    next: TaskKey | None


@dataclass(frozen=True, kw_only=True, slots=True)
class EventView:
    """One row of a task's history."""

    at: datetime
    event: EventKind
    detail: dict[str, Any]


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyCounts:
    """Tasks of one limited key: waiting, in flight, dispatched since the window began."""

    backlog: int = 0
    inflight: int = 0
    dispatched: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ScopeCountsQuery:
    """Which values of one scope kind to count: ``only`` these, or every value (None).

    For ``key:`` also every label under ``prefixes`` (its ``key:<prefix>:*`` rules):
    ``only`` and ``prefixes`` together say which labels, and neither means all.
    """

    scope: Scope
    only: frozenset[str] | None = None
    prefixes: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True, slots=True)
class RelayCounts:
    """The relay status counts, read in one transaction."""

    totals: KeyCounts
    # Per scope kind asked, per value with any task counted; values with none are absent.
    by_scope: Mapping[Scope, Mapping[str, KeyCounts]] = field(default_factory=dict)


class ReadStore(Protocol):
    """The reads behind the API's task view, long-poll sweep, relay status and readiness."""

    async def task(self, *, task_id: str, account: str) -> TaskView | None:
        """The task ``task_id`` if it belongs to ``account``; None otherwise."""
        ...

    async def tasks(self, query: TaskQuery) -> TaskPage:
        """A page of ``query.account``'s tasks matching ``query``, newest first.

        Its cost depends on the page, not on how many tasks the account or table holds:
        one keyset range in an index that holds the filter and the order (migration
        0005): a single range without a status or name filter, else one per status asked
        (every status for a name alone), merged.
        """
        ...

    async def events(self, *, task_id: str, account: str) -> list[EventView] | None:
        """The task's events oldest first, or None if it is not ``account``'s task."""
        ...

    async def terminal_task_ids(self, task_ids: Sequence[str]) -> list[str]:
        """Those of ``task_ids`` whose task is terminal (one statement per 500 ids)."""
        ...

    async def relay_counts(
        self, *, scopes: Sequence[ScopeCountsQuery], account: str | None, since: datetime
    ) -> RelayCounts:
        """Backlog, in flight and dispatched since ``since``: in all, and per scope value.

        With ``account``, only that account's tasks count. One grouped statement for the
        totals and one per scope kind, whatever the number of values.
        """
        ...

    async def ping(self) -> None:
        """Run one trivial statement; raise if the database does not answer."""
        ...

    async def write_blocker(self) -> str | None:
        """None if a write would succeed now, else why not (see throttler.store.writable)."""
        ...


VIEW_COLUMNS = (
    Task.id,
    Task.name,
    Task.status,
    Task.host,
    Task.result,
    Task.error,
    Task.attempts,
    Task.priority,
    Task.created_at,
    Task.run_at,
    Task.queued_at,
    Task.started_at,
    Task.finished_at,
    Task.labels,
)


def task_view(row: Row[Any]) -> TaskView:
    return TaskView(
        task_id=row.id,
        name=row.name,
        status=TaskStatus(row.status),
        host=row.host,
        result=row.result,
        error=row.error,
        attempts=row.attempts,
        priority=row.priority,
        created_at=row.created_at,
        run_at=row.run_at,
        queued_at=row.queued_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        labels=tuple(row.labels) if row.labels else (),
    )


def _page_branch(query: TaskQuery, status: TaskStatus | None, rows: int) -> Select[Any]:
    """The first ``rows`` tasks of ``query`` (of one ``status``, or any), newest first.

    Every condition is an equality on the index's leading columns or a range on its
    (created_at, id) tail, so the database reads exactly the rows it returns, in order.
    """
    conditions: list[ColumnElement[bool]] = [Task.account == query.account]
    if status is not None:
        conditions.append(Task.status == status.value)
    if query.name is not None:
        conditions.append(Task.name == query.name)
    if query.created_after is not None:
        conditions.append(Task.created_at > query.created_after)
    if query.created_before is not None:
        conditions.append(Task.created_at < query.created_before)
    if query.after is not None:
        # A row-value comparison: one index range on both databases, where the equivalent
        # OR of two comparisons may not be. Typed binds: SQLite stores times as naive text.
        conditions.append(
            tuple_(Task.created_at, Task.id)
            < tuple_(
                bindparam(None, query.after.created_at, type_=Task.created_at.type),
                bindparam(None, query.after.task_id, type_=Task.id.type),
            )
        )
    return (
        select(*VIEW_COLUMNS)
        .where(*conditions)
        .order_by(Task.created_at.desc(), Task.id.desc())
        .limit(rows)
    )


def _labelled_page(query: TaskQuery, rows: int, *, dialect: str | None) -> Select[Any]:
    """The first ``rows`` tasks of ``query`` with its label, newest first.

    One keyset range of ix_task_labels_account_label_created_at_task_id read backwards,
    each row's task read by primary key and kept if it matches the status and name
    asked: the page stops once it has ``rows`` tasks, having read the label's newest rows
    and never another task. On PostgreSQL the task is read in a fenced LATERAL subquery
    (OFFSET 0 keeps the planner from flattening it): as a plain join, with a status or
    name filter, the planner may instead hash-join every task of that status and name
    (ix_tasks_status_name, all accounts) and sort, a cost that grows with the table.
    SQLite has no LATERAL, and its planner drives this join from the label's index.
    """
    conditions: list[ColumnElement[bool]] = [
        TaskLabel.account == query.account,
        TaskLabel.label == query.label,
    ]
    if query.created_after is not None:
        conditions.append(TaskLabel.created_at > query.created_after)
    if query.created_before is not None:
        conditions.append(TaskLabel.created_at < query.created_before)
    if query.after is not None:
        conditions.append(
            tuple_(TaskLabel.created_at, TaskLabel.task_id)
            < tuple_(
                bindparam(None, query.after.created_at, type_=TaskLabel.created_at.type),
                bindparam(None, query.after.task_id, type_=TaskLabel.task_id.type),
            )
        )
    matches: list[ColumnElement[bool]] = [Task.id == TaskLabel.task_id]
    if query.statuses is not None:
        matches.append(Task.status.in_(sorted(status.value for status in query.statuses)))
    if query.name is not None:
        matches.append(Task.name == query.name)
    newest_first = (TaskLabel.created_at.desc(), TaskLabel.task_id.desc())
    if dialect == "postgresql":
        task = select(*VIEW_COLUMNS).where(*matches).offset(0).lateral("task")
        return (
            select(*task.c)
            .select_from(TaskLabel)
            .join(task, true())
            .where(*conditions)
            .order_by(*newest_first)
            .limit(rows)
        )
    return (
        select(*VIEW_COLUMNS)
        .select_from(TaskLabel)
        .join(Task, and_(*matches))
        .where(*conditions)
        .order_by(*newest_first)
        .limit(rows)
    )


def page_statement(query: TaskQuery, *, dialect: str | None = None) -> Select[Any]:
    """The statement behind ``ReadStore.tasks``: ``query.limit + 1`` rows, newest first.

    The extra row says whether another page follows. With a status or name filter, one
    branch per status, each a bounded range of ix_tasks_account_name_status_created_at_id or
    ix_tasks_account_status_created_at_id, merged: an index cannot keep the newest-first
    order across several values of a column it holds before created_at, and a sort of all
    the account's matching tasks would cost what the account holds. Public for the
    EXPLAIN test. With a label, the label's index drives the page (``_labelled_page``).
    """
    rows = query.limit + 1
    if query.label is not None:
        return _labelled_page(query, rows, dialect=dialect)
    if query.statuses is None and query.name is None:
        return _page_branch(query, None, rows)
    statuses = sorted(query.statuses if query.statuses is not None else TaskStatus)
    if len(statuses) == 1:
        return _page_branch(query, statuses[0], rows)
    # Each branch is a subquery: SQLite takes no ORDER BY or LIMIT in a compound's member.
    branches = [select(*_page_branch(query, status, rows).subquery().c) for status in statuses]
    merged = union_all(*branches).subquery()
    return select(*merged.c).order_by(merged.c.created_at.desc(), merged.c.id.desc()).limit(rows)


def _counts_query(
    key: ColumnElement[Any] | QueryableAttribute[Any],
    *,
    filters: Sequence[ColumnElement[bool]],
    since: datetime,
    by_label: bool = False,
) -> Select[Any, Any, Any, Any]:
    """Backlog, in-flight and recent dispatches grouped by ``key``, in one statement.

    ``by_label``: ``key`` is a task_labels column, joined to each task (a row per label).
    """
    # Constants are inlined: PostgreSQL cannot type a bound parameter in a UNION column.
    zero: ColumnElement[int] = literal_column("0", Integer)
    one: ColumnElement[int] = literal_column("1", Integer)
    live = (
        select(
            key.label("key"),
            case((Task.status == TaskStatus.PENDING.value, 1), else_=0).label("backlog"),
            case((Task.status.in_(_INFLIGHT), 1), else_=0).label("inflight"),
            zero.label("dispatched"),
        )
        .select_from(Task)
        .where(Task.status.in_(_LIVE), *filters)
    )
    recent = (
        select(key.label("key"), zero, zero, one)
        .select_from(TaskEvent)
        .join(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.event == EventKind.QUEUED.value, TaskEvent.at >= since, *filters)
    )
    if by_label:
        live = live.join(TaskLabel, TaskLabel.task_id == Task.id)
        recent = recent.join(TaskLabel, TaskLabel.task_id == Task.id)
    rows = union_all(live, recent).subquery()
    return select(
        rows.c.key.label("key"),
        func.sum(rows.c.backlog).label("backlog"),
        func.sum(rows.c.inflight).label("inflight"),
        func.sum(rows.c.dispatched).label("dispatched"),
    ).group_by(rows.c.key)


async def _grouped_counts(
    session: AsyncSession,
    key: ColumnElement[Any] | QueryableAttribute[Any],
    *,
    filters: Sequence[ColumnElement[bool]],
    since: datetime,
    by_label: bool = False,
) -> dict[str, KeyCounts]:
    rows = await session.execute(
        _counts_query(key, filters=filters, since=since, by_label=by_label)
    )
    return {
        str(row.key): KeyCounts(
            backlog=int(row.backlog or 0),
            inflight=int(row.inflight or 0),
            dispatched=int(row.dispatched or 0),
        )
        for row in rows
    }


def _scope_filters(query: ScopeCountsQuery, *, account: str | None) -> list[ColumnElement[bool]]:
    column = _SCOPE_COLUMNS[query.scope]
    filters: list[ColumnElement[bool]] = [column.is_not(None)]
    if account is not None:
        filters.append(Task.account == account)
    wanted: list[ColumnElement[bool]] = []
    if query.only is not None:
        wanted.append(column.in_(sorted(query.only)))
    # "_" is a LIKE wildcard and a prefix may hold one: escaped.
    wanted += [column.startswith(f"{p}:", autoescape=True) for p in sorted(query.prefixes)]
    if wanted:
        filters.append(or_(*wanted))
    return filters


class SqlReadStore:
    """The reference ``ReadStore``, in portable SQLAlchemy Core."""

    def __init__(
        self, *, read_sessions: SessionFactory, write_check: WriteCheck, dialect: str | None = None
    ) -> None:
        self._read_sessions = read_sessions
        self._write_check = write_check
        self._dialect = dialect  # the database's name: a label's page has its own form there

    async def task(self, *, task_id: str, account: str) -> TaskView | None:
        async with self._read_sessions() as session:
            row = (
                await session.execute(
                    select(*VIEW_COLUMNS).where(Task.id == task_id, Task.account == account)
                )
            ).one_or_none()
        return None if row is None else task_view(row)

    async def tasks(self, query: TaskQuery) -> TaskPage:
        async with self._read_sessions() as session:
            statement = page_statement(query, dialect=self._dialect)
            rows = (await session.execute(statement)).all()
        views = [task_view(row) for row in rows[: query.limit]]
        if len(rows) <= query.limit:
            return TaskPage(tasks=views, next=None)
        last = views[-1]
        return TaskPage(tasks=views, next=TaskKey(created_at=last.created_at, task_id=last.task_id))

    async def events(self, *, task_id: str, account: str) -> list[EventView] | None:
        # One statement, so ownership and history are read from one snapshot: the task's
        # row, joined to each of its events (a task with none still gives one row).
        statement = (
            select(TaskEvent.at, TaskEvent.event, TaskEvent.detail)
            .select_from(Task)
            .outerjoin(TaskEvent, TaskEvent.task_id == Task.id)
            .where(Task.id == task_id, Task.account == account)
            .order_by(TaskEvent.id)
        )
        async with self._read_sessions() as session:
            rows = (await session.execute(statement)).all()
        if not rows:
            return None
        return [
            EventView(at=row.at, event=EventKind(row.event), detail=row.detail)
            for row in rows
            if row.event is not None
        ]

    async def terminal_task_ids(self, task_ids: Sequence[str]) -> list[str]:
        terminal: list[str] = []
        if not task_ids:
            return terminal
        async with self._read_sessions() as session:
            for start in range(0, len(task_ids), TERMINAL_BATCH_SIZE):
                batch = task_ids[start : start + TERMINAL_BATCH_SIZE]
                found = await session.scalars(
                    select(Task.id).where(Task.id.in_(batch), Task.status.in_(_TERMINAL))
                )
                terminal.extend(found.all())
        return terminal

    async def relay_counts(
        self, *, scopes: Sequence[ScopeCountsQuery], account: str | None, since: datetime
    ) -> RelayCounts:
        everyone: list[ColumnElement[bool]] = [] if account is None else [Task.account == account]
        by_scope: dict[Scope, Mapping[str, KeyCounts]] = {}
        async with self._read_sessions() as session:
            everything = await _grouped_counts(
                session, literal_column("'all'"), filters=everyone, since=since
            )
            for query in scopes:
                by_scope[query.scope] = await _grouped_counts(
                    session,
                    _SCOPE_COLUMNS[query.scope],
                    filters=_scope_filters(query, account=account),
                    since=since,
                    by_label=query.scope is Scope.KEY,
                )
        return RelayCounts(totals=next(iter(everything.values()), KeyCounts()), by_scope=by_scope)

    async def ping(self) -> None:
        async with self._read_sessions() as session:
            await session.execute(text("SELECT 1"))

    async def write_blocker(self) -> str | None:
        return await self._write_check.blocker()


def open_reads(settings: Settings, engine: AsyncEngine) -> ReadStore:
    """Return the read store for ``engine``: the reference, on every database.

    ``settings`` is where a dialect override would be chosen; none pays (module docstring).
    """
    return SqlReadStore(
        read_sessions=create_read_session_factory(engine),
        write_check=open_write_check(settings, engine),
        dialect=engine.dialect.name,
    )
