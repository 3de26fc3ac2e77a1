"""A pooled PostgreSQL connection that died while idle is replaced before it is used.

The engine pings a connection at check-out only after it sat idle in the pool for
IDLE_PING_AFTER_S (throttler.db): the server ending the idle connection (a restart, an
administrator, an idle-session timeout) costs the next user nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.db import IDLE_PING_AFTER_S, create_engine
from throttler.settings import Settings

pytestmark = pytest.mark.postgres


@pytest.fixture
async def postgres(request: pytest.FixtureRequest) -> AsyncIterator[AsyncEngine]:
    url: str = request.getfixturevalue("postgres_database")
    engine = create_engine(Settings(database_url=url, database_pool_size=1))
    yield engine
    await engine.dispose()


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        pid = await connection.scalar(text("SELECT pg_backend_pid()"))
    assert isinstance(pid, int)
    return pid


async def test_a_connection_ended_while_idle_is_replaced_at_check_out(
    postgres: AsyncEngine, postgres_database: str
) -> None:
    first = await _backend_pid(postgres)
    # Another session ends the pooled connection's backend while it sits idle.
    other = create_engine(Settings(database_url=postgres_database))
    try:
        async with other.connect() as connection:
            assert await connection.scalar(text(f"SELECT pg_terminate_backend({first})"))
    finally:
        await other.dispose()
    await asyncio.sleep(IDLE_PING_AFTER_S * 1.5)
    # The next user gets a working connection (a new backend), not an error.
    second = await _backend_pid(postgres)
    assert second != first


async def test_only_a_connection_idle_for_a_while_is_pinged(postgres: AsyncEngine) -> None:
    statements: list[str] = []
    # The ping runs below SQLAlchemy (an empty statement): log at the driver.
    async with postgres.connect() as connection:
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        driver.add_query_logger(lambda query: statements.append(query.query))
    for _ in range(3):
        await _backend_pid(postgres)
    # In steady use: no ping, whatever else the transactions send.
    assert ";" not in statements, statements
    await asyncio.sleep(IDLE_PING_AFTER_S * 1.5)
    await _backend_pid(postgres)
    assert statements.count(";") == 1, statements
