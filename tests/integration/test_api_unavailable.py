"""A database that cannot take the request: 503 with Retry-After, quickly, nothing half-written."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import POSTGRES_ENV
from tests.support import admin_execute, wait_for
from throttler.settings import Settings, sqlite_path

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory, RowCounter

GREETING = "/api/v1/task/greeting"
UNKNOWN_RESULT = "/api/v1/task/result/00000000-0000-4000-8000-000000000000"
# The request must give up soon after the database timeout, not hang.
PROMPT_S = 5.0


def _sqlite_workers() -> set[threading.Thread]:
    """aiosqlite's per-connection worker threads that are still alive."""
    return {
        thread
        for thread in threading.enumerate()
        if thread.name.endswith("(_connection_worker_thread)")
    }


def _impatient(settings: Settings) -> Settings:
    return Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, database_timeout_s=0.5
    )


async def test_locked_sqlite_answers_503_with_retry_after(
    settings: Settings, make_api_client: ApiClientFactory, row_counts: RowCounter
) -> None:
    impatient = _impatient(settings)
    path = sqlite_path(settings.database_url)
    if path is None:
        pytest.skip("SQLite write lock; PostgreSQL has its own test")
    async with make_api_client(impatient) as client:
        # A first task goes through: the pool's connection is open and configured.
        assert (await client.post(GREETING, json={"name": "first"})).status_code == 202
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            started = time.monotonic()
            response = await client.post(GREETING, json={"name": "second"})
            elapsed_s = time.monotonic() - started
        finally:
            locker.rollback()
            locker.close()

    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert response.json() == {"detail": "database unavailable, retry later"}
    assert elapsed_s < PROMPT_S
    assert await row_counts() == {"tasks": 1, "outbox": 1, "task_events": 1}


@pytest.mark.parametrize("method", ["post", "get"])
async def test_unreachable_database_answers_503_with_retry_after(
    database_url: str,
    redis_url: str,
    make_api_client: ApiClientFactory,
    closed_port: int,
    tmp_path: Path,
    method: str,
) -> None:
    if database_url.startswith("sqlite"):
        # A file in a directory that does not exist cannot be opened.
        unreachable = f"sqlite+aiosqlite:///{tmp_path}/missing/dir/test.db"
    else:
        unreachable = f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port}/test"
    broken = Settings(database_url=unreachable, redis_url=redis_url, database_timeout_s=1.0)
    workers_before = _sqlite_workers()
    async with make_api_client(broken) as client:
        started = time.monotonic()
        if method == "post":
            response = await client.post(GREETING, json={"name": "Ada"})
        else:
            response = await client.get(UNKNOWN_RESULT)
        elapsed_s = time.monotonic() - started

    async def failed_connects_stopped() -> bool:
        return not _sqlite_workers() - workers_before

    # aiosqlite stops the worker of a failed connect without awaiting it; let the worker
    # finish while this test's event loop runs, or it reports into a closed loop later.
    await wait_for(failed_connects_stopped, message="aiosqlite workers of failed connects")

    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert elapsed_s < PROMPT_S


async def test_locked_postgres_table_answers_503_with_retry_after(
    settings: Settings,
    engine: AsyncEngine,
    make_api_client: ApiClientFactory,
    row_counts: RowCounter,
) -> None:
    if settings.is_sqlite:
        pytest.skip("PostgreSQL table lock; SQLite has its own test")
    async with make_api_client(_impatient(settings)) as client:
        assert (await client.post(GREETING, json={"name": "first"})).status_code == 202
        async with engine.connect() as locker, locker.begin():
            await locker.execute(text("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE"))
            started = time.monotonic()
            response = await client.post(GREETING, json={"name": "second"})
            elapsed_s = time.monotonic() - started
        # The pool recovers once the lock is gone.
        assert (await client.post(GREETING, json={"name": "third"})).status_code == 202

    assert response.status_code == 503
    assert int(response.headers["retry-after"]) > 0
    assert elapsed_s < PROMPT_S
    assert await row_counts() == {"tasks": 2, "outbox": 2, "task_events": 2}


async def test_unmigrated_database_answers_503_not_500(
    database_url: str, redis_url: str, make_api_client: ApiClientFactory, tmp_path: Path
) -> None:
    """Tables missing (migrations not run yet) is the environment's state, not a bug."""
    async with (
        _unmigrated(database_url, tmp_path) as empty_url,
        make_api_client(Settings(database_url=empty_url, redis_url=redis_url)) as client,
    ):
        submitted = await client.post(GREETING, json={"name": "Ada"})
        read = await client.get(UNKNOWN_RESULT)

    for response in (submitted, read):
        assert response.status_code == 503, response.text
        assert int(response.headers["retry-after"]) > 0


@asynccontextmanager
async def _unmigrated(database_url: str, tmp_path: Path) -> AsyncIterator[str]:
    """A database of the same kind as ``database_url``'s, with no tables at all."""
    if database_url.startswith("sqlite"):
        yield f"sqlite+aiosqlite:///{tmp_path}/unmigrated.db"
        return
    admin_url = os.environ[POSTGRES_ENV]
    name = f"throttler_unmigrated_{uuid.uuid4().hex[:12]}"
    await admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        await admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
