"""The worker against database outages: an outcome is written once the database is back."""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    fast_retries,
    running_worker,
    wait_final,
    wait_status,
)
from tests.support import event_history, wait_for
from throttler.db import SessionFactory, create_engine
from throttler.settings import Settings

# The final write gave up after this many tries before; the lock is held past them.
OLD_WRITE_TRIES = 5


@contextlib.asynccontextmanager
async def write_lock(settings: Settings) -> AsyncIterator[None]:
    """Hold the database's write lock on the tasks table from another connection."""
    if settings.is_sqlite:
        path = make_url(settings.database_url).database
        assert path is not None
        raw = sqlite3.connect(path, isolation_level=None)
        try:
            raw.execute("BEGIN IMMEDIATE")
            yield
            raw.execute("ROLLBACK")
        finally:
            raw.close()
        return
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            transaction = await connection.begin()
            await connection.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            yield
            await transaction.rollback()
    finally:
        await engine.dispose()


async def test_outcome_is_written_once_the_database_is_back(
    settings: Settings, sessions: SessionFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="worker.taskkit.persist")
    # Each try then fails fast (busy timeout, or statement timeout on PostgreSQL).
    settings = fast_retries(settings, database_timeout_s=0.05)

    def failed_tries() -> int:
        return sum(
            1
            for record in caplog.records
            if record.getMessage() == "task.write_retry"
            and getattr(record, "fields", {}).get("task_id") == task_id
        )

    async with arq_pool(settings) as pool, running_worker(settings):
        task_id = await dispatch(
            sessions,
            pool,
            settings,
            name="non_blocking_long_running_task",
            payload={"duration": 1},
        )
        await wait_status(sessions, task_id, "running")
        async with write_lock(settings):

            async def past_old_limit() -> bool:
                return failed_tries() > OLD_WRITE_TRIES

            await wait_for(past_old_limit, timeout_s=30, message="the write to fail 6 times")
        task = await wait_final(sessions, task_id)

    assert task.status == "succeeded"
    assert task.attempts == 1
    assert task.result == {"duration": 1}
    messages = [
        record.getMessage()
        for record in caplog.records
        if record.levelno >= logging.INFO
        and getattr(record, "fields", {}).get("task_id") == task_id
    ]
    # One line as the outage starts and one as it ends, however many tries in between.
    assert messages == ["task.write_failing", "task.write_recovered"]
    async with sessions() as session:
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "started",
            "succeeded",
        ]
