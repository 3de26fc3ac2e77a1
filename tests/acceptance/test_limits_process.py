"""Limits changed at run time, with real ``python -m api`` and ``python -m relay`` processes
(SQLite and, with TEST_POSTGRES_URL, PostgreSQL): two relays obey one PUT within about a
second, a lowered rate lets no old tokens through, a raised one takes effect at once, a
lowered cap admits nothing new (a change racing the claims), and a pause holds across a
relay restart and a Redis restart.

Releases are counted when ARQ could run each job: its queued moment, or its enqueue if
that came later (as ``bench.throttle`` does); no worker runs, so every job stays in ARQ.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from sqlalchemy import func, select

from bench.figures import max_in_window
from bench.throttle import enqueue_times_s
from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, Component, cluster
from tests.support import submit_greetings, wait_for
from throttler.db import SessionFactory
from throttler.models import Task, TaskEvent
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus

pytestmark = pytest.mark.slow

API = "/api/v1"
QUEUE = "arq:queue"


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    port = free_port()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
        yield http


def _env(settings: Settings, client: httpx.AsyncClient, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "API_PORT": str(client.base_url.port),
        **extra,
    }


async def _api_up(client: httpx.AsyncClient, running: Cluster) -> Component:
    api = running.start("api")

    async def up() -> bool:
        try:
            return (await client.get(f"{API}/limits")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(up, timeout_s=30, interval_s=0.1, message="the API up")
    return api


async def _call(client: httpx.AsyncClient, method: str, path: str, body: Any = None) -> float:
    """Make a limit change; return when it answered (POSIX seconds)."""
    answer = await client.request(method, f"{API}{path}", json=body)
    assert answer.status_code in (200, 204), answer.text
    return time.time()


async def _queued(sessions: SessionFactory, name: str | None = None) -> int:
    async with sessions() as session:
        query = select(func.count()).select_from(Task).where(Task.status == TaskStatus.QUEUED)
        if name is not None:
            query = query.where(Task.name == name)
        return int(await session.scalar(query) or 0)


async def _runnable_times(sessions: SessionFactory, redis_url: str) -> list[float]:
    async with sessions() as session:
        rows = await session.execute(
            select(TaskEvent.task_id, TaskEvent.at).where(TaskEvent.event == EventKind.QUEUED)
        )
        moments = {task_id: at.timestamp() for task_id, at in rows}
    enqueued = enqueue_times_s(SyncRedis.from_url(redis_url))
    return sorted(max(moment, enqueued[task_id]) for task_id, moment in moments.items())


def _between(times: list[float], start: float, end: float) -> list[float]:
    return [t for t in times if start <= t <= end]


def _seen_change(relay: Component, version: int) -> bool:
    return "relay.limits_changed" in relay.output() and f"version={version}" in relay.output()


async def test_two_relays_follow_a_lowered_then_raised_rate(
    settings: Settings,
    sessions: SessionFactory,
    redis: Redis,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    high, low = 200, 20
    await submit_greetings(sessions, 1500)
    env = _env(settings, client, RELAY_RATE=str(high), RELAY_BURST="1")
    with cluster(env=env, log_dir=tmp_path) as running:
        await _api_up(client, running)
        relays = [running.start("relay"), running.start("relay")]

        async def flowing() -> bool:
            return int(await redis.zcard(QUEUE)) >= 200

        await wait_for(flowing, timeout_s=30, interval_s=0.05, message="200 released")
        lowered_at = await _call(client, "PUT", "/limits/cluster", {"rate": f"{low}/s"})

        async def both_saw(version: int) -> bool:
            return all(_seen_change(relay, version) for relay in relays)

        await wait_for(lambda: both_saw(1), timeout_s=1.5, message="both relays reloading")
        seen_low_s = time.time() - lowered_at
        at_low = int(await redis.zcard(QUEUE))

        async def slow_run() -> bool:
            return int(await redis.zcard(QUEUE)) >= at_low + 3 * low

        await wait_for(slow_run, timeout_s=15, interval_s=0.1, message="3 s at the low rate")
        raised_at = await _call(client, "PUT", "/limits/cluster", {"rate": f"{high}/s"})
        await wait_for(lambda: both_saw(2), timeout_s=1.5, message="both relays reloading")
        at_high = int(await redis.zcard(QUEUE))

        async def fast_run() -> bool:
            return int(await redis.zcard(QUEUE)) >= at_high + 3 * high

        await wait_for(fast_run, timeout_s=15, interval_s=0.1, message="3 s at the high rate")
        for relay in relays:
            assert relay.stop() == 0

    times = await _runnable_times(sessions, settings.redis_url)
    slow = _between(times, lowered_at + 1.0, raised_at)
    worst_low = max_in_window(slow, 1.0)
    fast = _between(times, raised_at + 1.0, raised_at + 2.0)
    report = (
        f"seen_in_s={seen_low_s:.3f} worst_1s_after_lowering={worst_low} "
        f"worst_0.5s={max_in_window(slow, 0.5)} raised_1s_to_2s={len(fast)}"
    )
    print(report)
    assert worst_low <= low + 1, report
    assert max_in_window(slow, 0.5) <= low * 0.5 + 1, report
    assert max_in_window(slow, 2.0) <= low * 2 + 1, report
    assert len(fast) >= 0.9 * high, report


async def test_a_lowered_cap_admits_nothing_new_while_claims_race_it(
    settings: Settings,
    sessions: SessionFactory,
    redis: Redis,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    # Claims keep coming (a rate spreads the greetings out): the PUT lands amid them.
    await submit_greetings(sessions, 600)
    env = _env(settings, client, RELAY_LIMITS="task:greeting rate=100/s inflight=1000")
    with cluster(env=env, log_dir=tmp_path) as running:
        await _api_up(client, running)
        running.start("relay")
        running.start("relay")

        async def flowing() -> bool:
            return await _queued(sessions, "greeting") >= 50

        await wait_for(flowing, timeout_s=30, interval_s=0.02, message="greetings flowing")
        await _call(client, "PUT", "/limits/task:greeting", {"rate": "100/s", "inflight": 1})
        # Answered: whatever is queued now is all there will be while the count is >= 1.
        capped = await _queued(sessions, "greeting")

        async def witness() -> bool:
            # Another kind goes through: the relays claimed after the change.
            answer = await client.post(
                f"{API}/task/non_blocking_long_running_task", json={"duration": 0}
            )
            task_id = answer.json()["task_id"]

            async def queued() -> bool:
                view = (await client.get(f"{API}/tasks/{task_id}")).json()
                return bool(view["status"] == "queued")

            await wait_for(queued, timeout_s=5, interval_s=0.05, message="a witness released")
            return True

        for _ in range(3):
            await witness()
        assert await _queued(sessions, "greeting") == capped

        # Under the cap again only when every greeting in flight is cancelled.
        cancelled = await client.post(
            f"{API}/tasks/cancel", json={"status": "queued", "name": "greeting"}
        )
        assert cancelled.json()["count"] == capped

        async def one_more() -> bool:
            return await _queued(sessions, "greeting") == 1

        await wait_for(one_more, timeout_s=5, interval_s=0.05, message="one greeting let in")
        await witness()
        assert await _queued(sessions, "greeting") == 1


async def _waiting(client: httpx.AsyncClient, task_id: str) -> dict[str, Any]:
    view = (await client.get(f"{API}/tasks/{task_id}")).json()
    assert view["status"] == "pending", view
    waiting: dict[str, Any] = view["waiting"]
    return waiting


async def test_a_pause_holds_across_relay_and_redis_restarts(
    settings: Settings,
    sessions: SessionFactory,
    redis: Redis,
    client: httpx.AsyncClient,
    tmp_path: Path,
) -> None:
    env = _env(settings, client)
    with cluster(env=env, log_dir=tmp_path) as running:
        await _api_up(client, running)
        relay = running.start("relay")
        paused = (
            await client.post(f"{API}/limits/task:greeting/pause", json={"for_s": 600})
        ).json()
        greetings = [
            (await client.post(f"{API}/task/greeting", json={"name": f"g{n}"})).json()["task_id"]
            for n in range(5)
        ]

        async def others_go() -> bool:
            answer = await client.post(
                f"{API}/task/non_blocking_long_running_task", json={"duration": 0}
            )
            task_id = answer.json()["task_id"]

            async def queued() -> bool:
                try:
                    view = (await client.get(f"{API}/tasks/{task_id}")).json()
                except httpx.TransportError:
                    return False
                return bool(view["status"] == "queued")

            await wait_for(queued, timeout_s=15, interval_s=0.05, message="another scope released")
            return True

        async def says_paused() -> dict[str, Any]:
            waiting = await _waiting(client, greetings[0])
            return waiting if waiting["reason"] == "paused" else {}

        await others_go()
        waiting = await wait_for(says_paused, timeout_s=5, interval_s=0.1, message="paused")
        assert waiting["scope"] == "task:greeting"
        assert waiting["until"] == paused["paused_until"]

        assert relay.stop() == 0
        await redis.flushall()
        relay = running.start("relay")
        await others_go()
        await others_go()
        assert await _queued(sessions, "greeting") == 0
        await wait_for(says_paused, timeout_s=5, interval_s=0.1, message="paused again")

        await _call(client, "POST", "/limits/task:greeting/resume")

        async def all_released() -> bool:
            return await _queued(sessions, "greeting") == len(greetings)

        await wait_for(all_released, timeout_s=2, interval_s=0.05, message="greetings released")
        assert relay.stop() == 0
