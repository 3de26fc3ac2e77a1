"""A database seeded once per test module, for tests that only read query plans from it.

Seeding thousands of tasks costs more than the plan checks that read them, so a module's
tests share one seeded database per kind: its own SQLite file, or this test process's
PostgreSQL database, which other tests empty before they run (``seeded_engine`` seeds it
again then).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import _truncate_all
from throttler.db import create_engine
from throttler.models import Task
from throttler.settings import Settings
from throttler.store.intake import open_intake
from throttler.submit import NewTask, new_task_id

Seed = Callable[[AsyncEngine], Awaitable[None]]
# The params of a module-scoped fixture that calls ``seeded_database_url``.
DATABASES = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


async def _seed_url(url: str, seed: Seed) -> None:
    engine = create_engine(Settings(database_url=url))
    try:
        await seed(engine)
    finally:
        await engine.dispose()


def seeded_database_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
    *,
    name: str,
    seed: Seed,
) -> str:
    """The URL of a database of ``request.param``'s kind, emptied and seeded by ``seed``."""
    if request.param == "sqlite":
        path = tmp_path_factory.mktemp(name) / "seeded.db"
        shutil.copyfile(sqlite_template, path)
        url = f"sqlite+aiosqlite:///{path}"
    else:
        url = request.getfixturevalue("postgres_database")
        asyncio.run(_truncate_all(url))
    asyncio.run(_seed_url(url, seed))
    return url


@asynccontextmanager
async def seeded_engine(url: str, *, count: int, seed: Seed) -> AsyncIterator[AsyncEngine]:
    """An engine on ``url``'s seeded database, seeded again if another test emptied it
    since (only the PostgreSQL one is shared; the SQLite file is the module's own)."""
    engine = create_engine(Settings(database_url=url))
    try:
        async with engine.connect() as connection:
            tasks = await connection.scalar(select(func.count()).select_from(Task))
        if tasks != count:
            await _truncate_all(url)
            await seed(engine)
        yield engine
    finally:
        await engine.dispose()


async def insert_tasks(engine: AsyncEngine, tasks: Sequence[NewTask]) -> None:
    """Insert ``tasks`` through the production intake (its database's fast path, held to
    the reference by tests/integration/store/): thousands of rows in a fraction of the
    time the reference's multi-row statements take to build."""
    intake = open_intake(Settings(database_url=engine.url.render_as_string(False)), engine)
    try:
        await intake.insert(lambda: [intake.prepare(tasks)])
    finally:
        await intake.close()


def greetings(count: int, *, start: datetime) -> list[NewTask]:
    """``count`` greetings of one account, one per microsecond from ``start`` (their order)."""
    return [
        NewTask(
            name="greeting",
            account="default",
            payload={"name": f"n{index}"},
            created_at=start + timedelta(microseconds=index),
            task_id=new_task_id(),
        )
        for index in range(count)
    ]
