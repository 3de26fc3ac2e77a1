"""GET /api/v1/nodes, and /api/v1/relay/status saying whether any relay is alive."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx
from redis.asyncio import Redis

from throttler.nodes import ALIVE_WITHIN_S, Node, NodeKind, NodeRegistry
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

NODES = "/api/v1/nodes"
STATUS = "/api/v1/relay/status"
KEY = "key-a-0123456789"


def _node(kind: NodeKind, node_id: str, *, started_at: float) -> Node:
    return Node(kind=kind, id=node_id, host="host-a", pid=7, started_at=started_at)


async def test_nodes_lists_relays_and_workers_alive_or_dead(
    api_client: httpx.AsyncClient, redis: Redis
) -> None:
    registry = NodeRegistry(redis)
    now = registry.clock()
    await registry.beat(_node(NodeKind.RELAY, "relay-live", started_at=now - 10))
    await registry.beat(_node(NodeKind.WORKER, "worker-1", started_at=now - 5), running=2)
    # A relay whose last heartbeat is older than ALIVE_WITHIN_S: it died.
    stale = NodeRegistry(redis, clock=lambda: now - ALIVE_WITHIN_S - 5)
    await stale.beat(_node(NodeKind.RELAY, "relay-dead", started_at=now - 60))

    response = await api_client.get(NODES)

    assert response.status_code == 200
    body = response.json()
    assert [(r["id"], r["alive"]) for r in body["relays"]] == [
        ("relay-dead", False),
        ("relay-live", True),
    ]
    [worker] = body["workers"]
    assert set(worker) == {"id", "host", "pid", "started_at", "last_seen", "alive", "running"}
    assert (worker["id"], worker["host"], worker["pid"]) == ("worker-1", "host-a", 7)
    assert (worker["alive"], worker["running"]) == (True, 2)
    assert set(body["relays"][0]) == {"id", "host", "pid", "started_at", "last_seen", "alive"}


async def test_nodes_is_empty_when_nothing_runs(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get(NODES)
    assert response.status_code == 200
    assert response.json() == {"relays": [], "workers": []}


async def test_nodes_needs_an_api_key_when_keys_are_set(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    keyed = Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, api_keys=f"{KEY}:a"
    )
    async with make_api_client(keyed) as client:
        assert (await client.get(NODES)).status_code == 401
        authorized = await client.get(NODES, headers={"Authorization": f"Bearer {KEY}"})
        assert authorized.status_code == 200


async def test_relay_status_says_when_no_relay_is_alive(
    api_client: httpx.AsyncClient, redis: Redis
) -> None:
    alone = (await api_client.get(STATUS)).json()
    assert alone["relays_alive"] == 0
    assert "no relay is alive" in alone["note"]
    assert "totals" in alone  # the existing fields stay

    await NodeRegistry(redis).beat(_node(NodeKind.RELAY, "relay-1", started_at=0.0))
    served = (await api_client.get(STATUS)).json()
    assert (served["relays_alive"], served["note"]) == (1, None)


async def test_without_redis_nodes_is_503_and_relay_status_cannot_tell(
    settings: Settings, make_api_client: ApiClientFactory, closed_port: int
) -> None:
    no_redis = Settings(
        database_url=settings.database_url, redis_url=f"redis://127.0.0.1:{closed_port}/0"
    )
    async with make_api_client(no_redis) as client:
        nodes = await client.get(NODES)
        status = await client.get(STATUS)

    assert nodes.status_code == 503
    assert "Retry-After" in nodes.headers
    assert status.status_code == 200  # its counts come from the database
    assert status.json()["relays_alive"] is None
    assert "Redis unavailable" in status.json()["note"]
