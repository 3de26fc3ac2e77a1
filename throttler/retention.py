"""Retention: delete finished tasks, with their events, older than ``RETENTION_DAYS``.

Rows go in small batches, one transaction each, so a prune never holds the database's
write locks for long and relays keep dispatching in between.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from throttler.logs import fields
from throttler.models import utcnow
from throttler.periodic import Periodic
from throttler.settings import Settings
from throttler.store.recovery import RecoveryStore

log = logging.getLogger("retention")

PRUNE_BATCH_SIZE = 500
# How often the loop prunes: old rows accumulate slowly, a pass costs little when idle.
PRUNE_INTERVAL_S = 300.0


async def prune_once(
    *,
    store: RecoveryStore,
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
        count = await store.prune_finished(finished_before=cutoff, limit=batch_size)
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
        store: RecoveryStore,
        clock: Callable[[], datetime] = utcnow,
        interval_s: float = PRUNE_INTERVAL_S,
    ) -> None:
        super().__init__(interval_s=interval_s, log=log)
        self.settings = settings
        self.store = store
        self.clock = clock

    async def run_once(self) -> None:
        pruned = await prune_once(
            store=self.store, retention_days=self.settings.retention_days, now=self.clock()
        )
        if pruned:
            log.info(
                "retention.pruned",
                extra=fields(count=pruned, retention_days=self.settings.retention_days),
            )
