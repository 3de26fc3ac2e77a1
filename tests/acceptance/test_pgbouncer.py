"""Behind a real PgBouncer in transaction pooling mode (issue 13): `alembic upgrade head`,
then the api, two relays and two workers, all through a PgBouncer whose two server
connections they share, with DATABASE_PGBOUNCER=true: concurrent submissions under a
rate and a cap, cancels, retries, and every task ends once with the right status.
Without the setting the same processes fail on prepared statements, and so does one
engine whose two connections take turns on the two server connections.

Each test has its own database (created directly, as tests/conftest.py does) and its
own pgbouncer (Debian's package; the tests skip without it or without TEST_POSTGRES_URL).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bench.figures import max_in_window
from devtools.pgbouncer import PgBouncer, PgBouncerError, find_pgbouncer, start_pgbouncer
from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, cluster
from tests.conftest import POSTGRES_ENV
from tests.support import ROOT, admin_execute, migrate, wait_for
from throttler.db import create_engine
from throttler.models import Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES, EventKind

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.timeout(240)]

API = "/api/v1"
# Server connections PgBouncer keeps per database: fewer than the processes' clients,
# so every process's transactions run on connections another process used before.
SERVER_CONNECTIONS = 2
GREETINGS = 40
GREETING_RATE, GREETING_BURST = 20, 2
SLEEPS = 5
LIMITS = (
    f"task:greeting rate={GREETING_RATE}/s burst={GREETING_BURST}; "
    "task:non_blocking_long_running_task inflight=1"
)
# What asyncpg says when a prepared statement is not where it was left, is already there
# under another process's name, or is another process's statement under that name (which
# runs, if it takes as many parameters). Logs escape the quotes.
PREPARED_ERROR = re.compile(
    r'prepared statement \\?"__asyncpg_\w+\\?" (does not exist|already exists|requires)'
)


@dataclass(frozen=True, kw_only=True)
class Bounced:
    """A database of its own, reached directly and through a PgBouncer."""

    direct_url: str
    url: str
    bouncer: PgBouncer


@pytest.fixture
def bounced(tmp_path: Path) -> Iterator[Bounced]:
    admin_url = os.environ.get(POSTGRES_ENV)
    if not admin_url:
        pytest.skip(f"PgBouncer tests need {POSTGRES_ENV} (e.g. postgresql+asyncpg://...)")
    try:
        find_pgbouncer()
    except PgBouncerError as error:
        pytest.skip(f"PgBouncer tests need pgbouncer: {error}")
    name = f"throttler_pgbouncer_{uuid.uuid4().hex[:12]}"
    asyncio.run(admin_execute(admin_url, f'CREATE DATABASE "{name}"'))
    direct_url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    bouncer = start_pgbouncer(
        server_url=direct_url, workdir=tmp_path / "pgbouncer", pool_size=SERVER_CONNECTIONS
    )
    try:
        yield Bounced(direct_url=direct_url, url=bouncer.url(direct_url), bouncer=bouncer)
    finally:
        bouncer.stop()
        asyncio.run(admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# -- one engine ------------------------------------------------------------------------


async def _backend(connection: AsyncConnection) -> int:
    return int((await connection.execute(select(func.pg_backend_pid()))).scalar_one())


async def _take_turns(engine: AsyncEngine) -> None:
    """Connections of one engine taking turns on the two server connections, so that the
    first one's statement runs again on the server connection it was not prepared on."""
    statement = text("SELECT count(*) FROM tasks WHERE account = :account")
    async with engine.connect() as first, engine.connect() as second, engine.connect() as third:
        await first.begin()
        # Prepared (and, by default, cached) on this server connection.
        await first.execute(statement, {"account": "a"})
        prepared_on = await _backend(first)
        await second.begin()
        other = await _backend(second)
        await first.commit()
        await third.begin()
        assert await _backend(third) == prepared_on  # the one free
        await second.commit()
        await first.begin()
        assert await _backend(first) == other  # the one free
        await first.execute(statement, {"account": "b"})
        # Nothing prepared is left behind on the server connection either.
        left = await first.execute(text("SELECT count(*) FROM pg_prepared_statements"))
        assert left.scalar_one() == 0
        await first.commit()
        await third.commit()


@pytest.mark.parametrize("pgbouncer", [False, True], ids=["direct-settings", "pgbouncer"])
async def test_one_engine_whose_connections_take_turns(bounced: Bounced, pgbouncer: bool) -> None:
    await asyncio.to_thread(migrate, bounced.direct_url)
    engine = create_engine(Settings(database_url=bounced.url, database_pgbouncer=pgbouncer))
    try:
        if pgbouncer:
            await _take_turns(engine)
            await _take_turns(engine)  # and again, on connections that did it once
        else:
            with pytest.raises(DBAPIError, match=PREPARED_ERROR):
                await _take_turns(engine)
    finally:
        await engine.dispose()


# -- the processes ---------------------------------------------------------------------


def _env(bounced: Bounced, redis_url: str, api_port: int, *, pgbouncer: bool) -> dict[str, str]:
    env = {
        "DATABASE_URL": bounced.url,
        "REDIS_URL": redis_url,
        "API_PORT": str(api_port),
        "RELAY_LIMITS": LIMITS,
        # Many clients, two server connections: each process keeps a few.
        "DATABASE_POOL_SIZE": "4",
        "DATABASE_TIMEOUT_S": "10",
        "WORKER_RETRY_BACKOFF_S": "0.2",
        "LOG_LEVEL": "INFO",
    }
    if pgbouncer:
        env["DATABASE_PGBOUNCER"] = "true"
    return env


def _alembic_upgrade(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def api_port() -> int:
    return free_port()


@pytest.fixture
async def client(api_port: int) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=30) as http:
        yield http


def _alive(running: Cluster) -> None:
    for component in running.components:
        if component.process.poll() is not None:
            raise AssertionError(f"{component.module} exited:\n{component.output()[-3000:]}")


async def _ready(http: httpx.AsyncClient, running: Cluster) -> None:
    async def ready() -> bool:
        _alive(running)
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout_s=60, interval_s=0.1, message="the api to be ready")


def _start_all(running: Cluster) -> None:
    for module in ("api", "relay", "relay", "worker", "worker"):
        running.start(module)


async def _submit(http: httpx.AsyncClient, name: str, body: dict[str, Any]) -> str:
    answer = await http.post(f"{API}/task/{name}", json=body)
    assert answer.status_code == 202, answer.text
    task_id: str = answer.json()["task_id"]
    return task_id


async def _post(http: httpx.AsyncClient, path: str, body: Any = None) -> dict[str, Any]:
    answer = await http.post(f"{API}{path}", json=body)
    assert answer.status_code == 200, answer.text
    document: dict[str, Any] = answer.json()
    return document


async def _status(http: httpx.AsyncClient, task_id: str) -> str:
    status: str = (await http.get(f"{API}/tasks/{task_id}")).json()["status"]
    return status


async def _ended(http: httpx.AsyncClient, running: Cluster, task_ids: list[str]) -> None:
    async def all_terminal() -> bool:
        _alive(running)
        statuses = await asyncio.gather(*(_status(http, task_id) for task_id in task_ids))
        return all(status in TERMINAL_STATUSES for status in statuses)

    await wait_for(all_terminal, timeout_s=90, interval_s=0.2, message="every task to end")


async def _histories(engine: AsyncEngine) -> dict[str, list[str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(TaskEvent.task_id, TaskEvent.event).order_by(TaskEvent.id)
        )
        histories: dict[str, list[str]] = {}
        for task_id, event in rows:
            histories.setdefault(task_id, []).append(event)
        return histories


async def _queued(engine: AsyncEngine, name: str) -> list[float]:
    """When ``name``'s tasks were released, sorted (seconds)."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(TaskEvent.at)
            .join(Task, Task.id == TaskEvent.task_id)
            .where(Task.name == name, TaskEvent.event == EventKind.QUEUED)
        )
        return sorted(at.timestamp() for at in rows.scalars())


async def _runs(engine: AsyncEngine, name: str) -> list[tuple[float, float]]:
    """Each run of ``name``'s tasks: (started, ended) seconds."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(TaskEvent.task_id, TaskEvent.event, TaskEvent.at)
            .join(Task, Task.id == TaskEvent.task_id)
            .where(Task.name == name)
            .order_by(TaskEvent.id)
        )
        started: dict[str, float] = {}
        runs = []
        for task_id, event, at in rows:
            if event == EventKind.STARTED:
                started[task_id] = at.timestamp()
            elif task_id in started and event in TERMINAL_STATUSES:
                runs.append((started.pop(task_id), at.timestamp()))
        return runs


async def test_the_services_run_through_pgbouncer_in_transaction_mode(
    bounced: Bounced,
    redis_url: str,
    api_port: int,
    client: httpx.AsyncClient,
    file_server: str,
    tmp_path: Path,
) -> None:
    env = _env(bounced, redis_url, api_port, pgbouncer=True)
    migrated = _alembic_upgrade(env)
    assert migrated.returncode == 0, migrated.stderr[-3000:]

    with cluster(env=env, log_dir=tmp_path) as running:
        _start_all(running)
        await _ready(client, running)
        sleep_scope = "task:non_blocking_long_running_task"
        await _post(client, f"/limits/{sleep_scope}/pause", {"for_s": 600})

        greetings, sleeps, downloads = await asyncio.gather(
            asyncio.gather(
                *(_submit(client, "greeting", {"name": f"g{n}"}) for n in range(GREETINGS))
            ),
            asyncio.gather(
                *(
                    _submit(client, "non_blocking_long_running_task", {"duration": 1})
                    for _ in range(SLEEPS)
                )
            ),
            # Loopback without DOWNLOAD_ALLOW_PRIVATE: refused, failed without a retry.
            asyncio.gather(*(_submit(client, "download", {"url": file_server}) for _ in range(3))),
        )
        # Paused, so still pending: these cancels all land, and one is retried.
        cancelled = sleeps[:2]
        for task_id in cancelled:
            assert (await _post(client, f"/tasks/{task_id}/cancel"))["status"] == "cancelled"
        recalled = cancelled[1]
        assert (await _post(client, f"/tasks/{recalled}/retry"))["status"] == "pending"
        await _post(client, f"/limits/{sleep_scope}/resume")

        async def failed_first() -> bool:
            return await _status(client, downloads[0]) == "failed"

        await wait_for(failed_first, timeout_s=60, interval_s=0.1, message="a download refused")
        assert (await _post(client, f"/tasks/{downloads[0]}/retry"))["status"] == "pending"

        everything = [*greetings, *sleeps, *downloads]
        await _ended(client, running, everything)
        statuses = await asyncio.gather(*(_status(client, task_id) for task_id in everything))
        logs = {component.log_path.name: component.output() for component in running.components}
        for component in running.components:
            if component.module != "api":  # the api ends by its signal (uvicorn)
                assert component.stop() == 0, component.output()[-3000:]

    for name, log in logs.items():
        assert not PREPARED_ERROR.search(log), f"{name}:\n{log[-3000:]}"
        assert "Traceback" not in log, f"{name}:\n{log[-3000:]}"
    expected = {task_id: "succeeded" for task_id in [*greetings, *sleeps]}
    expected.update({task_id: "cancelled" for task_id in cancelled})
    expected[recalled] = "succeeded"
    expected.update({task_id: "failed" for task_id in downloads})
    assert dict(zip(everything, statuses, strict=True)) == expected

    ran = ["submitted", "queued", "started"]
    engine = create_async_engine(bounced.direct_url)
    try:
        histories = await _histories(engine)
        greetings_queued = await _queued(engine, "greeting")
        sleep_runs = await _runs(engine, "non_blocking_long_running_task")
    finally:
        await engine.dispose()
    for task_id in greetings:
        assert histories[task_id] == [*ran, "succeeded"], histories[task_id]
    for task_id in sleeps:
        if task_id not in cancelled:
            assert histories[task_id] == [*ran, "succeeded"], histories[task_id]
    assert histories[cancelled[0]] == ["submitted", "cancelled"]
    after_retry = ["retried", "queued", "started"]
    assert histories[recalled] == ["submitted", "cancelled", *after_retry, "succeeded"]
    assert histories[downloads[0]] == [*ran, "failed", *after_retry, "failed"]
    for task_id in downloads[1:]:
        assert histories[task_id] == [*ran, "failed"], histories[task_id]
    # Every task ended exactly once per run, and the limits held.
    ends = Counter(e for history in histories.values() for e in history if e in TERMINAL_STATUSES)
    assert ends == {"succeeded": GREETINGS + SLEEPS - 1, "cancelled": 1 + 1, "failed": 3 + 1}
    assert len(greetings_queued) == GREETINGS
    assert max_in_window(greetings_queued, 1.0) <= GREETING_RATE + GREETING_BURST
    sleep_runs.sort()
    assert all(ended <= next_start for (_, ended), (next_start, _) in pairwise(sleep_runs)), (
        sleep_runs
    )


async def test_without_the_setting_the_services_fail_through_pgbouncer(
    bounced: Bounced,
    redis_url: str,
    api_port: int,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    await asyncio.to_thread(migrate, bounced.direct_url)
    env = _env(bounced, redis_url, api_port, pgbouncer=False)
    with cluster(env=env, log_dir=tmp_path) as running:
        _start_all(running)

        async def broken() -> bool:
            # Submissions keep the api, the relays and the workers busy meanwhile.
            with_load = [
                client.post(f"{API}/task/greeting", json={"name": f"g{n}"}) for n in range(10)
            ]
            await asyncio.gather(*with_load, return_exceptions=True)
            return any(PREPARED_ERROR.search(c.output()) for c in running.components)

        await wait_for(broken, timeout_s=90, interval_s=0.2, message="a prepared statement error")
