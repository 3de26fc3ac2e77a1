"""Real `python -m api|relay|worker`: GET /api/v1/nodes shows who runs, who died, what runs."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, cluster
from tests.support import wait_for
from throttler.nodes import ALIVE_WITHIN_S

pytestmark = pytest.mark.slow

NODES = "/api/v1/nodes"
STATUS = "/api/v1/relay/status"
# Long enough to be watched running; the worker cancels it at the end.
TASK_S = 60


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    port = free_port()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield http


async def _nodes(http: httpx.AsyncClient, running: Cluster) -> dict[str, Any] | None:
    for component in running.components:
        # Killed or stopped by the test are expected; anything else is a crash.
        if component.process.poll() not in (None, 0, -signal.SIGKILL):
            raise AssertionError(f"{component.module} exited:\n{component.output()[-3000:]}")
    try:
        response = await http.get(NODES)
    except httpx.TransportError:
        return None
    body: dict[str, Any] = response.json()
    return body


async def test_nodes_show_the_relay_and_worker_and_the_relay_dying(
    database_url: str, redis_url: str, client: httpx.AsyncClient, tmp_path: Path
) -> None:
    env = {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(client.base_url.port),
        "WORKER_SHUTDOWN_GRACE_S": "0.5",
    }
    with cluster(env=env, log_dir=tmp_path) as running:
        running.start("api")
        relay = running.start("relay")
        worker = running.start("worker")

        async def both_alive() -> dict[str, Any] | None:
            body = await _nodes(client, running)
            if body is None:
                return None
            alive = [n for n in body["relays"] + body["workers"] if n["alive"]]
            return body if len(alive) == 2 else None

        body = await wait_for(both_alive, timeout_s=30, interval_s=0.2, message="both alive")
        assert body is not None
        [relay_node], [worker_node] = body["relays"], body["workers"]
        assert (relay_node["pid"], worker_node["pid"]) == (relay.process.pid, worker.process.pid)
        assert worker_node["running"] == 0

        submitted = await client.post(
            "/api/v1/task/non_blocking_long_running_task", json={"duration": TASK_S}
        )
        assert submitted.status_code in (200, 201, 202), submitted.text

        async def running_one() -> bool:
            body = await _nodes(client, running)
            return body is not None and [w["running"] for w in body["workers"]] == [1]

        await wait_for(running_one, timeout_s=20, interval_s=0.2, message="worker running 1")

        relay.process.send_signal(signal.SIGKILL)
        relay.process.wait()

        async def relay_dead() -> dict[str, Any] | None:
            body = await _nodes(client, running)
            if body is None or [r["alive"] for r in body["relays"]] != [False]:
                return None
            return body

        body = await wait_for(
            relay_dead, timeout_s=ALIVE_WITHIN_S + 15, interval_s=0.2, message="relay dead"
        )
        assert body is not None
        assert body["relays"][0]["id"] == relay_node["id"]  # still listed, so it is seen dying
        assert [w["alive"] for w in body["workers"]] == [True]
        status = (await client.get(STATUS)).json()
        assert status["relays_alive"] == 0
        assert "no relay is alive" in status["note"]

        # A clean stop deregisters: the worker leaves the list at once.
        assert worker.stop() == 0
        after = await _nodes(client, running)
        assert after is not None
        assert after["workers"] == []
