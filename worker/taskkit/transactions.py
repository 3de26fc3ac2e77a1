"""Where the status writer runs a batch: a thread of its own on SQLite, else async.

Through the async SQLite driver every statement costs several hops between the event loop
and the driver's thread (cursor, execute, fetch, close), each a wake-up of both: a batch
of five statements took about thirty. On SQLite the whole transaction therefore runs in
one thread of the writer's own on the standard ``sqlite3`` driver (worker.taskkit.
sqlite_batch): one hop per batch, and its statements' CPU leaves the event loop. On
PostgreSQL asyncpg is natively async: the batch runs throttler.lifecycle's statements
through ``run_sync`` on the worker's async engine.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Protocol

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.lifecycle import Attempt, Outcome, record_outcomes, start_attempts
from throttler.settings import Settings
from worker.taskkit.sqlite_batch import SqliteBatches

# What a batch returns: the attempts started (by task id) and the ids whose outcome was
# written (a task already final is in neither).
BatchResult = tuple[dict[str, Attempt], set[str]]


class Batches(Protocol):
    """Writes starts and outcomes in one transaction."""

    async def write(
        self, *, starts: Sequence[str], outcomes: Sequence[Outcome], worker_id: str, now: datetime
    ) -> BatchResult: ...

    async def close(self) -> None: ...


class AsyncEngineBatches:
    """Each batch on a connection of the worker's async engine (PostgreSQL)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def write(
        self, *, starts: Sequence[str], outcomes: Sequence[Outcome], worker_id: str, now: datetime
    ) -> BatchResult:
        def work(connection: Connection) -> BatchResult:
            started = start_attempts(connection, task_ids=starts, worker_id=worker_id, now=now)
            return started, record_outcomes(connection, outcomes)

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)

    async def close(self) -> None:
        """Nothing of its own: the engine belongs to the worker's resources."""


class SqliteThreadBatches:
    """Each batch in one dedicated thread, on its own ``sqlite3`` connection."""

    def __init__(self, settings: Settings) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="status-writer")
        self._batches = SqliteBatches(settings)

    async def write(
        self, *, starts: Sequence[str], outcomes: Sequence[Outcome], worker_id: str, now: datetime
    ) -> BatchResult:
        work = functools.partial(
            self._batches.write, starts=starts, outcomes=outcomes, worker_id=worker_id, now=now
        )
        return await asyncio.get_running_loop().run_in_executor(self._thread, work)

    async def close(self) -> None:
        # A sqlite3 connection may only be closed by the thread that opened it.
        await asyncio.get_running_loop().run_in_executor(self._thread, self._batches.close)
        self._thread.shutdown(wait=True)


def open_batches(settings: Settings, *, engine: AsyncEngine) -> Batches:
    """The status writer's way to the database of ``DATABASE_URL``."""
    if settings.is_sqlite:
        return SqliteThreadBatches(settings)
    return AsyncEngineBatches(engine)
