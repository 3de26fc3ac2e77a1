"""The dashboard's own reads, each bounded by an index (never a scan of ``tasks``).

The live counts are ``api.cluster_view.ClusterReader`` counting only ``LIVE_STATUSES``:
pending, queued and running sit in short ranges of ``ix_tasks_status_name``, while a count
of the finished ones reads the whole table (the metrics view does that, in the background,
at most every ``METRICS_REFRESH_S``). The statements are the store's
(``throttler.store.monitoring``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from throttler.statuses import INFLIGHT_STATUSES, TaskStatus
from throttler.store.monitoring import Failure, MonitoringStore

LIVE_STATUSES = (TaskStatus.PENDING, *sorted(INFLIGHT_STATUSES))
FAILURES = 10
FAILURES_WINDOW = timedelta(hours=24)


class DashboardReads:
    """Recent failures, and which account a task id belongs to."""

    def __init__(self, monitoring: MonitoringStore) -> None:
        self._monitoring = monitoring

    async def failures(self, *, account: str | None, now: datetime) -> list[Failure]:
        """The latest failures of the window; every account's when ``account`` is None."""
        return await self._monitoring.failures(
            account=account, since=now - FAILURES_WINDOW, limit=FAILURES
        )

    async def account_of(self, task_id: str) -> str | None:
        """The account of task ``task_id`` (its primary key), or None if there is none."""
        return await self._monitoring.account_of(task_id)
