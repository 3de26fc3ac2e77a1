"""Real `python -m api` and `python -m relay`: a view says why its task waits, and a relay
that is killed (no clean stop, no deregistration) stops vouching for it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from devtools.redis_server import free_port
from tests.acceptance.processes import cluster
from tests.support import wait_for
from throttler.constants import WAITING_BOARDS_KEY
from throttler.nodes import ALIVE_WITHIN_S

pytestmark = pytest.mark.slow

API = "/api/v1"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    port = free_port()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield http


async def _reason(http: httpx.AsyncClient, task_id: str) -> dict[str, Any] | None:
    try:
        view = (await http.get(f"{API}/tasks/{task_id}")).json()
    except httpx.TransportError:
        return None
    waiting: dict[str, Any] | None = view["waiting"]
    return waiting


async def test_a_real_relay_publishes_why_and_a_killed_one_stops_vouching(
    database_url: str,
    redis_url: str,
    redis: Redis,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(client.base_url.port),
        # The relay sleeps until the cluster's next token, an hour on: so does its board.
        "RELAY_LIMITS": "cluster rate=1/h burst=1",
    }
    with cluster(env=env, log_dir=tmp_path) as running:
        running.start("api")
        relay = running.start("relay")

        async def submitted() -> str:
            try:
                response = await client.post(f"{API}/task/greeting", json={"name": "x"})
            except httpx.TransportError:
                return ""
            task_id: str = response.json()["task_id"]
            return task_id

        await wait_for(submitted, timeout_s=30, interval_s=0.1, message="the API up")
        second = await wait_for(submitted, message="a second greeting")

        async def rate() -> dict[str, Any]:
            waiting = await _reason(client, second)
            return waiting if waiting and waiting["reason"] == "rate" else {}

        waiting = await wait_for(rate, timeout_s=30, interval_s=0.1, message="rate")
        assert waiting["scope"] == "cluster"

        relay.kill()  # SIGKILL: its board and registration stay in Redis

        async def no_relay() -> bool:
            waiting = await _reason(client, second)
            return waiting is not None and waiting["reason"] == "no_relay"

        # Its heartbeat goes stale within ALIVE_WITHIN_S; its board is still there.
        await wait_for(no_relay, timeout_s=ALIVE_WITHIN_S + 5, message="no relay alive")
        assert await redis.hlen(WAITING_BOARDS_KEY) == 1  # type: ignore[misc]
