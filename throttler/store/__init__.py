"""The storage seam: every read and write the pipeline makes, and nothing else does SQL.

One module per concern, each a small ``Protocol`` with a portable SQLAlchemy Core
reference and, where it was measured to pay, a dialect fast path that overrides single
methods (``sqlite_*.py``, ``postgres_*.py``); ``tests/integration/store/`` holds every
override to its reference row for row. Outside this package no module names a dialect
or a driver (``throttler.db`` creates engines, ``throttler.settings`` reads URLs).

- ``intake``: insert submissions (tasks, outbox rows, ``submitted`` events) in batches.
- ``attempts``: start attempts and record outcomes in batches (the worker).
- ``outbox``: the relay's claim transaction: serialize, count, select, lease, release.
- ``recovery``: the reconciler's candidates and guarded requeue/fail, retention, and the
  last dispatch moment (the drain floor).
- ``reads``: the task view, the long-poll sweep, relay status counts, readiness.
- ``monitoring``: what /metrics and /dashboard show: counts per status and the outbox's
  depth, recent failures, releases per second.
- ``retries``, ``cancels``: a user's retry or cancel, of one task or by filter.

Each component opens the store once (``open_store``) on its engine and hands the parts
it uses to the code that uses them; nothing of the store opens connections until used.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.settings import Settings
from throttler.store.attempts import Attempts, open_attempts
from throttler.store.cancels import CancelStore
from throttler.store.intake import Intake, open_intake
from throttler.store.monitoring import MonitoringStore, open_monitoring
from throttler.store.outbox import CoreOutbox, open_outbox
from throttler.store.reads import ReadStore, open_reads
from throttler.store.recovery import RecoveryStore, open_recovery
from throttler.store.retries import RetryStore

__all__ = ["Store", "open_store"]


@dataclass(frozen=True, kw_only=True, slots=True)
class Store:
    """The database behind one component: one part per concern, on one engine."""

    intake: Intake
    attempts: Attempts
    outbox: CoreOutbox
    recovery: RecoveryStore
    reads: ReadStore
    monitoring: MonitoringStore
    retries: RetryStore
    cancels: CancelStore

    async def close(self) -> None:
        """Stop the parts' own threads and connections (safe to call more than once).

        The engine is the caller's: it disposes of it after this.
        """
        await self.intake.close()
        await self.attempts.close()


def open_store(settings: Settings, engine: AsyncEngine) -> Store:
    """The store for ``DATABASE_URL``'s database: each part the fastest for its dialect."""
    return Store(
        intake=open_intake(settings, engine),
        attempts=open_attempts(settings, engine),
        outbox=open_outbox(settings=settings, engine=engine),
        recovery=open_recovery(settings, engine),
        reads=open_reads(settings, engine),
        monitoring=open_monitoring(settings, engine),
        retries=RetryStore(engine),
        cancels=CancelStore(engine),
    )
