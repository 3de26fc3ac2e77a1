"""Retention: delete finished tasks, with their events, older than ``RETENTION_DAYS``.

Rows go in small batches, one transaction each, so a prune never holds the database (on
SQLite its one write lock) for long and relays keep dispatching in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.db import SessionFactory
from throttler.logs import fields
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.periodic import Periodic
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES

log = logging.getLogger("retention")

PRUNE_BATCH_SIZE = 500
# How often the loop prunes: old rows accumulate slowly, a pass costs little when idle.
PRUNE_INTERVAL_S = 300.0
_TERMINAL = sorted(status.value for status in TERMINAL_STATUSES)


async def _prune_batch(session: AsyncSession, *, cutoff: datetime, limit: int) -> int:
    # SKIP LOCKED: two relays pruning at once take different rows (PostgreSQL).
    task_ids = list(
        (
            await session.execute(
                select(Task.id)
                .where(Task.status.in_(_TERMINAL), Task.finished_at < cutoff)
                .limit(limit)
                .with_for_update(of=Task, skip_locked=True)
            )
        ).scalars()
    )
    if not task_ids:
        return 0
    # Explicit deletes rather than relying on ON DELETE CASCADE alone: SQLite enforces
    # it only with PRAGMA foreign_keys on, which a tool opening the file may not set.
    await session.execute(delete(TaskEvent).where(TaskEvent.task_id.in_(task_ids)))
    await session.execute(delete(OutboxEntry).where(OutboxEntry.task_id.in_(task_ids)))
    await session.execute(delete(Task).where(Task.id.in_(task_ids), Task.status.in_(_TERMINAL)))
    return len(task_ids)


async def prune_once(
    *,
    sessions: SessionFactory,
    retention_days: int,
    now: datetime,
    batch_size: int = PRUNE_BATCH_SIZE,
    max_batches: int | None = None,
) -> int:
    """Delete terminal tasks finished more than ``retention_days`` ago; return how many.

    ``retention_days`` 0 keeps everything. Each batch of ``batch_size`` tasks is its own
    transaction; ``max_batches`` bounds one call's work.
    """
    if retention_days <= 0:
        return 0
    cutoff = now - timedelta(days=retention_days)
    pruned = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        async with sessions.begin() as session:
            count = await _prune_batch(session, cutoff=cutoff, limit=batch_size)
        pruned += count
        batches += 1
        if count < batch_size:
            break
    return pruned


class Pruner(Periodic):
    """Run ``prune_once`` every ``PRUNE_INTERVAL_S`` while ``RETENTION_DAYS`` is set."""

    name = "retention"

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: SessionFactory,
        clock: Callable[[], datetime] = utcnow,
        interval_s: float = PRUNE_INTERVAL_S,
    ) -> None:
        super().__init__(interval_s=interval_s, log=log)
        self.settings = settings
        self.sessions = sessions
        self.clock = clock

    async def run_once(self) -> None:
        pruned = await prune_once(
            sessions=self.sessions,
            retention_days=self.settings.retention_days,
            now=self.clock(),
        )
        if pruned:
            log.info(
                "retention.pruned",
                extra=fields(count=pruned, retention_days=self.settings.retention_days),
            )
