"""The whole system as a user runs it: api, relay and worker processes, real Redis and DB."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from bench.figures import max_in_window
from devtools.redis_server import free_port
from tests.acceptance.conftest import DOWNLOAD_BODY
from tests.acceptance.processes import Cluster, cluster
from tests.support import event_history, event_times, wait_for
from throttler.db import SessionFactory
from throttler.models import Task
from throttler.statuses import TERMINAL_STATUSES

pytestmark = pytest.mark.slow


@pytest.fixture
def api_port() -> int:
    return free_port()


def _env(database_url: str, redis_url: str, api_port: int, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(api_port),
        "DOWNLOAD_ALLOW_PRIVATE": "true",
        "LOG_LEVEL": "INFO",
        **extra,
    }


@pytest.fixture
async def client(api_port: int) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as http:
        yield http


async def _wait_ready(http: httpx.AsyncClient, running: Cluster) -> None:
    async def ready() -> bool:
        for component in running.components:
            if component.process.poll() is not None:
                raise AssertionError(f"{component.module} exited:\n{component.output()[-3000:]}")
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout_s=30, message="the api to be ready")


async def _wait_terminal(http: httpx.AsyncClient, task_ids: list[str], timeout_s: float) -> None:
    async def all_terminal() -> bool:
        views = await asyncio.gather(*(http.get(f"/api/v1/task/result/{i}") for i in task_ids))
        return all(view.json()["status"] in TERMINAL_STATUSES for view in views)

    await wait_for(all_terminal, timeout_s=timeout_s, interval_s=0.1, message="tasks to finish")


async def test_each_task_kind_runs_through_the_whole_pipeline(
    database_url: str,
    redis_url: str,
    api_port: int,
    client: httpx.AsyncClient,
    file_server: str,
    sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    requests = {
        "greeting": {"name": "Ada"},
        "download": {"url": file_server},
        "blocking_long_running_task": {"duration": 1},
        "non_blocking_long_running_task": {"duration": 1},
    }
    with cluster(env=_env(database_url, redis_url, api_port), log_dir=tmp_path) as running:
        for module in ("api", "relay", "worker"):
            running.start(module)
        await _wait_ready(client, running)

        submitted: dict[str, str] = {}
        for name, body in requests.items():
            answer = await client.post(f"/api/v1/task/{name}", json=body)
            assert answer.status_code == 202, answer.text
            view = answer.json()
            assert view["status"] == "pending"
            assert answer.headers["location"] == f"/api/v1/task/result/{view['task_id']}"
            submitted[name] = view["task_id"]

        await _wait_terminal(client, list(submitted.values()), timeout_s=30)
        views = {
            name: (await client.get(f"/api/v1/task/result/{task_id}")).json()
            for name, task_id in submitted.items()
        }

    assert {name: view["status"] for name, view in views.items()} == dict.fromkeys(
        requests, "succeeded"
    ), views
    assert views["greeting"]["result"] == {"message": "Hello, Ada!"}
    download = views["download"]["result"]
    assert download["status_code"] == 200
    assert download["content_length"] == len(DOWNLOAD_BODY)
    assert download["sha256"] == hashlib.sha256(DOWNLOAD_BODY).hexdigest()
    assert views["blocking_long_running_task"]["result"]["duration"] == 1
    assert views["non_blocking_long_running_task"]["result"]["duration"] == 1
    for view in views.values():
        assert view["attempts"] == 1
        assert view["created_at"] <= view["queued_at"] <= view["started_at"]
        assert view["started_at"] <= view["finished_at"]

    async with sessions() as session:
        for task_id in submitted.values():
            assert await event_history(session, task_id) == [
                "submitted",
                "queued",
                "started",
                "succeeded",
            ]


async def test_hundred_greetings_are_released_at_the_configured_rate(
    database_url: str,
    redis_url: str,
    api_port: int,
    client: httpx.AsyncClient,
    sessions: SessionFactory,
    tmp_path: Path,
) -> None:
    rate, burst, count = 20, 1, 100
    env = _env(database_url, redis_url, api_port, RELAY_RATE=str(rate), RELAY_BURST=str(burst))
    with cluster(env=env, log_dir=tmp_path) as running:
        for module in ("api", "relay", "worker"):
            running.start(module)
        await _wait_ready(client, running)

        answers = await asyncio.gather(
            *(client.post("/api/v1/task/greeting", json={"name": f"n{i}"}) for i in range(count))
        )
        assert all(answer.status_code == 202 for answer in answers)
        task_ids = [answer.json()["task_id"] for answer in answers]
        await _wait_terminal(client, task_ids, timeout_s=30)

    async with sessions() as session:
        statuses = (await session.execute(select(Task.status))).scalars().all()
        assert statuses == ["succeeded"] * count
        queued = await event_times(session, "queued")
        assert len(queued) == count
        # Guarantee 3: over any window of length T at most rate*T + burst are released.
        assert max_in_window(queued, 1.0) <= rate + burst
        assert max_in_window(queued, 0.5) <= rate * 0.5 + burst
        for task_id in task_ids:
            assert await event_history(session, task_id) == [
                "submitted",
                "queued",
                "started",
                "succeeded",
            ]
