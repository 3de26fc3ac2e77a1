"""The monitoring reads: what GET /metrics and /dashboard show of the database.

- ``task_counts``: tasks per status and the outbox's depth and oldest row, in one session:
  of every status (a count over the whole table, which the metrics view runs in the
  background only) or of some (the dashboard's live statuses: short ranges of
  ``ix_tasks_status_name``). The one read behind both.
- ``failures``: the latest ``failed`` events since a moment (``ix_task_events_event_at``
  read backwards, each event's task by primary key); ``account_of``: a task's account.
- ``releases``: ``queued`` events per whole second and (name, account, host), and per
  label: a range of ``ix_task_events_event_at`` joined to each task (or its labels) by
  primary key, so the cost follows the releases counted, never the tables' size.

``SqlMonitoringStore`` is the reference, portable SQLAlchemy Core, on every database; no
dialect pays for an override. The one dialect-specific piece is the whole Unix second of
a timestamp (``epoch_second``: SQLite stores UTC text). The statements are public for the
plan tests (tests/integration/test_api_dashboard.py, ``bench.dashboard_paint``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import BigInteger, ColumnElement, Integer, Select, cast, func, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import QueryableAttribute

from throttler.db import SessionFactory, create_read_session_factory
from throttler.models import OutboxEntry, Task, TaskEvent, TaskLabel
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskCounts:
    """Tasks per status counted, and the outbox's depth and oldest row, read together."""

    # Each status counted, 0 where no task has it; a status not counted is absent.
    by_status: Mapping[TaskStatus, int] = field(default_factory=dict)
    # The outbox holds the backlog only: its size follows the pending tasks.
    outbox_backlog: int = 0
    # When the oldest outbox row was written; None when the outbox is empty.
    outbox_oldest: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    """One ``failed`` event and its task."""

    task_id: str
    name: str
    account: str
    at: datetime
    # The event's ``error``, if it says one.
    error: str | None


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskReleases:
    """How many tasks of one (name, account, host) were released in one second."""

    second: int  # Unix time, whole seconds
    name: str
    account: str
    host: str | None
    released: int


@dataclass(frozen=True, kw_only=True, slots=True)
class LabelReleases:
    """How many tasks carrying one label were released in one second."""

    second: int  # Unix time, whole seconds
    label: str
    released: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ReleaseCounts:
    """The releases of a range of seconds: per (name, account, host), and per label asked."""

    tasks: list[TaskReleases] = field(default_factory=list)
    labels: list[LabelReleases] = field(default_factory=list)


class MonitoringStore(Protocol):
    """The reads behind GET /metrics' cluster view and /dashboard's summary."""

    async def task_counts(self, *, statuses: Sequence[TaskStatus] | None = None) -> TaskCounts:
        """Tasks of each of ``statuses`` (every status when None), and the outbox.

        Every status: a count over the whole table. A few: a range of the status index each.
        """
        ...

    async def failures(self, *, account: str | None, since: datetime, limit: int) -> list[Failure]:
        """The latest ``limit`` failures since ``since``, newest first; of ``account`` only
        when given."""
        ...

    async def account_of(self, task_id: str) -> str | None:
        """The account of task ``task_id`` (its primary key), or None if there is none."""
        ...

    async def releases(self, *, since: int, until: int, labels: Sequence[str]) -> ReleaseCounts:
        """The releases of each second from ``since`` to ``until`` (Unix seconds, both
        included), per (name, account, host), and per each of ``labels`` (none if empty)."""
        ...


def epoch_second(
    at: ColumnElement[Any] | QueryableAttribute[Any], dialect: str
) -> ColumnElement[int]:
    """The whole Unix second of a timestamp column (SQLite stores UTC text)."""
    if dialect == "sqlite":
        return cast(func.strftime("%s", at), Integer)
    return cast(func.floor(func.extract("epoch", at)), BigInteger)


def status_counts_statement(statuses: Sequence[TaskStatus] | None) -> Select[str, int]:
    """Tasks per status: of ``statuses`` only (ranges of ``ix_tasks_status_name``), or all."""
    statement = select(Task.status, func.count().label("tasks"))
    if statuses is not None:
        statement = statement.where(Task.status.in_([status.value for status in statuses]))
    return statement.group_by(Task.status)


def outbox_statement() -> Select[int, datetime]:
    """The outbox's row count and its oldest row's ``created_at``."""
    return select(func.count().label("backlog"), func.min(OutboxEntry.created_at).label("oldest"))


def failures_statement(*, account: str | None, since: datetime, limit: int) -> Select[Any]:
    """The latest ``failed`` events since ``since``: ``ix_task_events_event_at`` backwards."""
    statement = (
        select(TaskEvent.task_id, TaskEvent.at, TaskEvent.detail, Task.name, Task.account)
        .select_from(TaskEvent)
        .join(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.event == EventKind.FAILED.value, TaskEvent.at >= since)
        .order_by(TaskEvent.at.desc())
        .limit(limit)
    )
    if account is not None:
        statement = statement.where(Task.account == account)
    return statement


def _window(since: int, until: int) -> tuple[ColumnElement[bool], ...]:
    return (
        TaskEvent.event == EventKind.QUEUED.value,
        TaskEvent.at >= _moment(since),
        TaskEvent.at < _moment(until + 1),
    )


def releases_statement(
    *, dialect: str, since: int, until: int
) -> Select[int, str, str, str | None, int]:
    """Releases per second and (name, account, host) from second ``since`` to ``until``."""
    second = epoch_second(TaskEvent.at, dialect).label("second")
    return (
        select(second, Task.name, Task.account, Task.host, func.count().label("released"))
        .select_from(TaskEvent)
        .join(Task, Task.id == TaskEvent.task_id)
        .where(*_window(since, until))
        .group_by(second, Task.name, Task.account, Task.host)
    )


def labels_statement(
    *, dialect: str, since: int, until: int, labels: Sequence[str]
) -> Select[int, str, int]:
    """Releases per second of the tasks carrying each of ``labels``."""
    second = epoch_second(TaskEvent.at, dialect).label("second")
    return (
        select(second, TaskLabel.label, func.count().label("released"))
        .select_from(TaskEvent)
        .join(TaskLabel, TaskLabel.task_id == TaskEvent.task_id)
        .where(*_window(since, until), TaskLabel.label.in_(list(labels)))
        .group_by(second, TaskLabel.label)
    )


class SqlMonitoringStore:
    """The reference ``MonitoringStore``, in portable SQLAlchemy Core."""

    def __init__(self, *, read_sessions: SessionFactory, dialect: str) -> None:
        self._read_sessions = read_sessions
        self._dialect = dialect  # the database's name: how a timestamp becomes a second

    async def task_counts(self, *, statuses: Sequence[TaskStatus] | None = None) -> TaskCounts:
        counted = dict.fromkeys(TaskStatus if statuses is None else statuses, 0)
        async with self._read_sessions() as session:
            for row in await session.execute(status_counts_statement(statuses)):
                counted[TaskStatus(row.status)] = int(row.tasks)
            outbox = (await session.execute(outbox_statement())).one()
        return TaskCounts(
            by_status=counted, outbox_backlog=int(outbox.backlog or 0), outbox_oldest=outbox.oldest
        )

    async def failures(self, *, account: str | None, since: datetime, limit: int) -> list[Failure]:
        statement = failures_statement(account=account, since=since, limit=limit)
        async with self._read_sessions() as session:
            rows = (await session.execute(statement)).all()
        return [
            Failure(
                task_id=row.task_id,
                name=row.name,
                account=row.account,
                at=row.at,
                error=_error(row.detail),
            )
            for row in rows
        ]

    async def account_of(self, task_id: str) -> str | None:
        async with self._read_sessions() as session:
            account: str | None = await session.scalar(
                select(Task.account).where(Task.id == task_id)
            )
        return account

    async def releases(self, *, since: int, until: int, labels: Sequence[str]) -> ReleaseCounts:
        tasks: list[TaskReleases] = []
        by_label: list[LabelReleases] = []
        async with self._read_sessions() as session:
            released = releases_statement(dialect=self._dialect, since=since, until=until)
            tasks += [
                TaskReleases(
                    second=int(row.second),
                    name=row.name,
                    account=row.account,
                    host=row.host,
                    released=int(row.released),
                )
                for row in await session.execute(released)
            ]
            if labels:
                labelled = labels_statement(
                    dialect=self._dialect, since=since, until=until, labels=labels
                )
                by_label += [
                    LabelReleases(
                        second=int(row.second), label=row.label, released=int(row.released)
                    )
                    for row in await session.execute(labelled)
                ]
        return ReleaseCounts(tasks=tasks, labels=by_label)


def open_monitoring(settings: Settings, engine: AsyncEngine) -> MonitoringStore:
    """Return the monitoring store for ``engine``: the reference, on every database.

    ``settings`` is where a dialect override would be chosen; none pays (module docstring).
    """
    return SqlMonitoringStore(
        read_sessions=create_read_session_factory(engine), dialect=engine.dialect.name
    )


def _moment(second: int) -> datetime:
    return datetime.fromtimestamp(second, UTC)


def _error(detail: object) -> str | None:
    if isinstance(detail, dict):
        error = detail.get("error")
        return None if error is None else str(error)
    return None
