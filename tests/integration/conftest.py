"""Fixtures shared by the integration tests, grouped by the component they drive."""

from __future__ import annotations

import asyncio
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from api.app import create_app
from tests.conftest import POSTGRES_ENV
from tests.support import admin_execute
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, TaskEvent
from throttler.settings import Settings

# --- api ----------------------------------------------------------------------------------

ApiClientFactory = Callable[[Settings], AbstractAsyncContextManager[httpx.AsyncClient]]
RowCounter = Callable[[], Awaitable[dict[str, int]]]


@asynccontextmanager
async def _serve_api(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it in-process, as a client would over HTTP."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api.test") as client,
    ):
        yield client


@pytest.fixture
def make_api_client() -> ApiClientFactory:
    """Open an API client for custom settings: ``async with make_api_client(s) as c``."""
    return _serve_api


@pytest.fixture
async def api_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the API on the test's database and Redis, authentication off."""
    async with _serve_api(settings) as client:
        yield client


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


@pytest.fixture
def row_counts(sessions: SessionFactory) -> RowCounter:
    """Count the rows a submission writes, to prove a rejected request wrote nothing."""

    async def count() -> dict[str, int]:
        async with sessions() as session:
            return {
                model.__tablename__: int(
                    await session.scalar(select(func.count()).select_from(model)) or 0
                )
                for model in (Task, OutboxEntry, TaskEvent)
            }

    return count


# --- empty databases ---------------------------------------------------------------------


@pytest.fixture
def empty_sqlite(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"


@pytest.fixture
def empty_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL database with nothing in it, dropped afterwards."""
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"PostgreSQL tests of an empty database need {POSTGRES_ENV}")
    name = f"throttler_empty_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(admin_url, f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        asyncio.run(admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_database(request: pytest.FixtureRequest) -> str:
    """An empty database (no schema) on each dialect, for migration tests."""
    url: str = request.getfixturevalue(f"empty_{request.param}")
    return url
