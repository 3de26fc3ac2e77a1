"""The dashboard's own reads, each bounded by an index (never a scan of ``tasks``).

``LiveClusterReader`` is ``api.cluster_view.ClusterReader`` counting only the live
statuses: pending, queued and running sit in short ranges of ``ix_tasks_status_name``,
while a count of the finished ones reads the whole table (the metrics view does that, in
the background, at most every ``METRICS_REFRESH_S``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from api.cluster_view import ClusterReader
from throttler.db import create_read_session_factory
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.statuses import INFLIGHT_STATUSES, EventKind, TaskStatus

LIVE_STATUSES = (TaskStatus.PENDING, *sorted(INFLIGHT_STATUSES))
FAILURES = 10
FAILURES_WINDOW = timedelta(hours=24)


class LiveClusterReader(ClusterReader):
    """The cluster view with exact counts of the live statuses only (the others 0)."""

    __slots__ = ()

    async def _tasks_and_outbox(self) -> tuple[dict[str, int], int, float]:
        now = utcnow()
        by_status = {status.value: 0 for status in TaskStatus}
        sessions = create_read_session_factory(self.engine)
        async with sessions() as session:
            rows = await session.execute(
                select(Task.status, func.count())
                .where(Task.status.in_([status.value for status in LIVE_STATUSES]))
                .group_by(Task.status)
            )
            for status, count in rows:
                by_status[str(status)] = int(count)
            # The outbox holds the backlog only: its size follows the pending tasks.
            outbox = (
                await session.execute(select(func.count(), func.min(OutboxEntry.created_at)))
            ).one()
        oldest = outbox[1]
        age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
        return by_status, int(outbox[0] or 0), age


@dataclass(frozen=True, kw_only=True, slots=True)
class Failure:
    task_id: str
    name: str
    account: str
    at: datetime
    error: str | None


def failures_statement(
    *, account: str | None, since: datetime, limit: int = FAILURES
) -> Select[Any]:
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


class DashboardReads:
    """Recent failures, and which account a task id belongs to."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sessions = create_read_session_factory(engine)

    async def failures(self, *, account: str | None, now: datetime) -> list[Failure]:
        """The latest failures of the window; every account's when ``account`` is None."""
        statement = failures_statement(account=account, since=now - FAILURES_WINDOW)
        async with self._sessions() as session:
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
        """The account of task ``task_id`` (its primary key), or None if there is none."""
        async with self._sessions() as session:
            account: str | None = await session.scalar(
                select(Task.account).where(Task.id == task_id)
            )
        return account


def _error(detail: object) -> str | None:
    if isinstance(detail, dict):
        error = detail.get("error")
        return None if error is None else str(error)
    return None
