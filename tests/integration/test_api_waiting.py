"""Why is it waiting? Task views against a real relay, Redis and database (both dialects).

The relay runs in this event loop with its heartbeat, as ``python -m relay`` runs it; the
API is the real app. Each test waits on the view until it says what the relay decided.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx
from arq.connections import ArqRedis, RedisSettings, create_pool
from redis.asyncio import Redis

from relay.relay import Relay
from tests.integration.conftest import ApiClientFactory
from tests.support import wait_for
from throttler.constants import WAITING_BOARDS_KEY
from throttler.db import create_engine
from throttler.limits import LimitKey, Scope
from throttler.models import utcnow
from throttler.nodes import Heartbeat, Node, NodeKind, NodeRegistry
from throttler.settings import Settings
from throttler.store import open_store
from throttler.throttle import build_limiter
from throttler.waiting import WaitingBoard

log = logging.getLogger(__name__)
API = "/api/v1"
STOP_TIMEOUT_S = 10.0


def _configured(settings: Settings, **overrides: Any) -> Settings:
    # A fresh object, not model_copy: that would carry over a cached limit_rules.
    # The relay runs in the API's process here: on a machine loaded by the rest of the
    # suite its SQLite claim can hold the write lock past the default 5 s between two
    # turns of the shared event loop, and the intake would answer 503; that is the
    # lock-timeout tests' subject (test_api_unavailable), not these.
    return Settings(**{**settings.model_dump(), "database_timeout_s": 30, **overrides})


@asynccontextmanager
async def running_relay(settings: Settings) -> AsyncIterator[Relay]:
    """A relay and its heartbeat, as ``python -m relay`` runs them, until the block ends."""
    arq: ArqRedis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    engine = create_engine(settings)
    relay = Relay(
        settings=settings,
        outbox=open_store(settings, engine).outbox,
        arq=arq,
        limiter=build_limiter(redis=arq, rules=settings.limit_rules),
    )
    heartbeat = Heartbeat(
        registry=NodeRegistry(arq),
        node=Node.this_process(NodeKind.RELAY, relay.relay_id),
        log=log,
    )
    tasks = [asyncio.create_task(relay.run()), asyncio.create_task(heartbeat.run())]
    try:
        yield relay
    finally:
        relay.stop()
        heartbeat.stop()
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=STOP_TIMEOUT_S)
        await arq.aclose()
        await engine.dispose()


async def _submit(client: httpx.AsyncClient, name: str, body: dict[str, Any], **query: Any) -> str:
    response = await client.post(f"{API}/task/{name}", json=body, params=query)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


async def _view(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    response = await client.get(f"{API}/tasks/{task_id}")
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def _until_view(
    client: httpx.AsyncClient, task_id: str, *, message: str, **wanted: Any
) -> dict[str, Any]:
    """The task's view once every field in ``wanted`` (``waiting`` as its reason) holds."""

    async def matches() -> dict[str, Any]:
        view = await _view(client, task_id)
        seen = dict(view)
        if view["waiting"] is not None:
            seen["waiting"] = view["waiting"]["reason"]
        return view if all(seen[field] == value for field, value in wanted.items()) else {}

    return await wait_for(matches, timeout_s=10, message=message)


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


async def test_a_rate_limited_task_waits_for_its_scopes_next_token(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    configured = _configured(settings, relay_limits="task:greeting rate=1/m burst=1")
    async with make_api_client(configured) as client, running_relay(configured):
        before = utcnow()
        first, *others = [await _submit(client, "greeting", {"name": f"n{i}"}) for i in range(3)]
        await _until_view(client, first, status="queued", message="the first greeting queued")
        for task_id in others:
            view = await _until_view(
                client, task_id, waiting="rate", message="a greeting waiting for a token"
            )
            assert view["status"] == "pending"
            assert view["waiting"]["scope"] == "task:greeting"
            # The next token: a minute after the first one's (taken a handover lead ahead),
            # not the relay's early re-ask moment.
            until = _time(view["waiting"]["until"])
            assert before + timedelta(seconds=60) < until <= utcnow() + timedelta(seconds=61)
        # Not pending: no reason to give.
        assert (await _view(client, first))["waiting"] is None
        # The list names the same reasons, from one read of the boards.
        listed = (await client.get(f"{API}/tasks")).json()["tasks"]
        by_id = {view["task_id"]: view["waiting"] for view in listed}
        assert by_id[first] is None
        assert [by_id[task_id]["reason"] for task_id in others] == ["rate", "rate"]


async def test_the_task_list_reads_the_boards_once(
    settings: Settings, make_api_client: ApiClientFactory, redis: Redis
) -> None:
    configured = _configured(settings, relay_limits="task:greeting rate=1/m burst=1")
    async with make_api_client(configured) as client, running_relay(configured):
        ids = [await _submit(client, "greeting", {"name": f"n{i}"}) for i in range(5)]
        await _until_view(client, ids[-1], waiting="rate", message="a greeting waiting")
        await redis.config_resetstat()
        listed = (await client.get(f"{API}/tasks")).json()["tasks"]
        stats = await redis.info("commandstats")
    assert sorted(view["waiting"]["reason"] for view in listed if view["waiting"]) == ["rate"] * 4
    assert stats["cmdstat_hgetall"]["calls"] == 1
    assert stats["cmdstat_zrangebyscore"]["calls"] == 1


async def test_a_task_behind_a_full_inflight_cap_says_so(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    configured = _configured(settings, relay_limits="task:blocking_long_running_task inflight=1")
    body = {"duration": 30}
    async with make_api_client(configured) as client, running_relay(configured):
        first = await _submit(client, "blocking_long_running_task", body)
        # Handed to ARQ (no worker runs here): it holds the one slot until it finishes.
        await _until_view(client, first, status="queued", message="the first task queued")
        second = await _submit(client, "blocking_long_running_task", body)
        view = await _until_view(client, second, waiting="inflight", message="the cap held")
        assert view["waiting"] == {
            "reason": "inflight",
            "scope": "task:blocking_long_running_task",
            "until": None,
        }
        # Another kind is not held back by that cap.
        other = await _submit(client, "greeting", {"name": "x"})
        await _until_view(client, other, status="queued", message="a greeting queued")


async def test_a_delayed_task_is_scheduled_until_its_run_at(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(settings) as client, running_relay(settings):
        response = await client.post(
            f"{API}/task/greeting", json={"name": "later"}, params={"delay_s": 60}
        )
        assert response.status_code == 202
        answered = response.json()
        assert answered["waiting"] == {
            "reason": "scheduled",
            "scope": None,
            "until": answered["run_at"],
        }
        view = await _view(client, answered["task_id"])
    assert view["waiting"] == answered["waiting"]
    assert _time(view["waiting"]["until"]) == _time(view["run_at"])


async def test_without_a_live_relay_a_pending_task_says_no_relay(
    settings: Settings, make_api_client: ApiClientFactory, redis: Redis
) -> None:
    no_relay = {"reason": "no_relay", "scope": None, "until": None}
    async with make_api_client(settings) as client:
        task_id = await _submit(client, "greeting", {"name": "alone"})
        assert (await _view(client, task_id))["waiting"] == no_relay
        configured = _configured(settings, relay_rate=0.001, relay_burst=1)
        async with running_relay(configured) as relay:
            # Its one token goes to the first task; then the cluster bucket is empty.
            await _until_view(client, task_id, status="queued", message="the task queued")
            second = await _submit(client, "greeting", {"name": "next"})
            view = await _until_view(client, second, waiting="rate", message="cluster empty")
            assert view["waiting"]["scope"] == "cluster"
            assert await redis.hexists(WAITING_BOARDS_KEY, relay.relay_id)  # type: ignore[misc]
        # A relay that stopped forgets its board and leaves the registry.
        assert not await redis.hexists(WAITING_BOARDS_KEY, relay.relay_id)  # type: ignore[misc]
        assert (await _view(client, second))["waiting"] == no_relay


async def test_a_full_queue_holds_tasks_back(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    configured = _configured(settings, relay_max_queue_depth=1)
    async with make_api_client(configured) as client, running_relay(configured):
        first = await _submit(client, "greeting", {"name": "a"})
        # No worker takes it: ARQ's queue stays at its depth.
        await _until_view(client, first, status="queued", message="the first task queued")
        second = await _submit(client, "greeting", {"name": "b"})
        view = await _until_view(client, second, waiting="queue_full", message="queue full")
        assert view["waiting"] == {"reason": "queue_full", "scope": None, "until": None}


async def test_a_live_relay_that_saw_nothing_in_the_way_means_its_turn(
    settings: Settings, make_api_client: ApiClientFactory, redis: Redis
) -> None:
    # A relay that is alive (it heartbeats) but has not published a board yet: its claim
    # loop has not run, so nothing it decided holds the task back.
    heartbeat = Heartbeat(
        registry=NodeRegistry(redis), node=Node.this_process(NodeKind.RELAY, "idle"), log=log
    )
    beating = asyncio.create_task(heartbeat.run())
    try:
        async with make_api_client(settings) as client:
            task_id = await _submit(client, "greeting", {"name": "a"})
            await wait_for(
                lambda: NodeRegistry(redis).alive_ids(NodeKind.RELAY), message="a live relay"
            )
            view = await _view(client, task_id)
    finally:
        heartbeat.stop()
        await asyncio.wait_for(beating, timeout=STOP_TIMEOUT_S)
    assert view["waiting"] == {"reason": "turn", "scope": None, "until": None}


async def test_waiting_is_null_when_redis_cannot_be_asked(
    settings: Settings, make_api_client: ApiClientFactory, closed_port: int
) -> None:
    away = _configured(settings, redis_url=f"redis://127.0.0.1:{closed_port}/0")
    async with make_api_client(away) as client:
        response = await client.post(f"{API}/task/greeting", json={"name": "a"})
        # The intake's commit does not need Redis; its 202 asks no relay.
        assert response.status_code == 202, response.text
        assert response.json()["waiting"]["reason"] == "turn"
        view = await _view(client, response.json()["task_id"])
    assert view["status"] == "pending"
    assert view["waiting"] is None


async def test_only_current_boards_of_live_relays_count(
    settings: Settings, make_api_client: ApiClientFactory, redis: Redis
) -> None:
    now = utcnow()
    registry = NodeRegistry(redis)
    await registry.beat(Node.this_process(NodeKind.RELAY, "live"))
    greeting = LimitKey(scope=Scope.TASK, value="greeting")

    async def publish(relay_id: str, expires_in_s: float) -> None:
        board = WaitingBoard(
            relay_id=relay_id,
            written_at=now,
            rate={greeting: now + timedelta(seconds=60)},
            expires_at=now + timedelta(seconds=expires_in_s),
        )
        await redis.hset(WAITING_BOARDS_KEY, mapping={relay_id: board.encode()})  # type: ignore[misc]

    async with make_api_client(settings) as client:
        task_id = await _submit(client, "greeting", {"name": "a"})
        await publish("dead", expires_in_s=600)  # its relay never heartbeats
        await publish("live", expires_in_s=-1)  # its relay's board went stale
        assert (await _view(client, task_id))["waiting"]["reason"] == "turn"
        await publish("live", expires_in_s=600)
        assert (await _view(client, task_id))["waiting"]["reason"] == "rate"
