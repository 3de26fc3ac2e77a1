"""A Sentinel failover under load: the master SIGKILLed while tasks flow under a rate limit.

A master, a replica and three sentinels (the plain ``redis-server --sentinel``) serve an
api, two relays and two workers configured with REDIS_SENTINELS only (REDIS_URL's host
points nowhere). Mid-run the master is SIGKILLed; the sentinels promote the replica after
``down-after-milliseconds`` (1 s). From the database's audit trail the test then checks:
every task terminal exactly once and succeeded, and the cluster rate held over every
window, before, across and after the failover. Run with ``-s`` for figures.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.figures import max_in_window
from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, cluster
from tests.acceptance.redis_servers import (
    SENTINEL_SERVICE,
    SentinelGroup,
    stack_env,
    start_sentinel_group,
)
from tests.support import submit_task, wait_for
from throttler.constants import RATE_GENERATION_KEY
from throttler.db import (
    SessionFactory,
    create_engine,
    create_read_session_factory,
    create_session_factory,
)
from throttler.models import Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import TERMINAL_STATUSES, EventKind, TaskStatus

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RATE, BURST = 50, 5
VIA_API = 60
DIRECT = 540
INSERT_BATCH = 30
# The master dies this long after the first submission (600 tasks at 50/s take 12 s).
KILL_AFTER_S = 4.0
# Windows over which released tasks are counted against rate·T + burst.
WINDOWS_S = (0.2, 0.5, 1.0, 2.0, 5.0)
SETTLE_TIMEOUT_S = 90.0


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    group = start_sentinel_group(tmp_path / "redis")
    yield group
    group.stop()


def _check_alive(running: Cluster) -> None:
    for component in running.components:
        if component.process.poll() is not None:
            raise AssertionError(f"{component.module} exited:\n{component.output()[-3000:]}")


async def _insert(writer: SessionFactory, count: int) -> list[str]:
    """Submit greetings as the api does, a batch per transaction, at about the rate."""
    ids: list[str] = []
    for start in range(0, count, INSERT_BATCH):
        async with writer.begin() as session:
            for index in range(start, min(count, start + INSERT_BATCH)):
                task = await submit_task(
                    session,
                    name="greeting",
                    account="default",
                    payload={"name": f"direct-{index}"},
                    now=utcnow(),
                )
                ids.append(task.id)
        await asyncio.sleep(INSERT_BATCH / (2 * RATE))  # a backlog builds, still growing
    return ids


async def _post(http: httpx.AsyncClient, count: int) -> list[str]:
    ids = []
    for index in range(count):
        answer = await http.post("/api/v1/task/greeting", json={"name": f"api-{index}"})
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["task_id"])
    return ids


def _generation(group: SentinelGroup) -> tuple[str, int, str]:
    """The bucket generation on the new master (its server, its number), and its run_id."""
    client = redis.Redis(host="127.0.0.1", port=group.replica.port, socket_timeout=5)
    try:
        saved = client.get(RATE_GENERATION_KEY)
        run_id = str(cast(dict[str, Any], client.info("server"))["run_id"])
    finally:
        client.close()
    assert isinstance(saved, bytes), saved
    server, number = saved.decode().split(" ")
    return server, int(number), run_id


def _outages(outputs: dict[str, str]) -> list[str]:
    """Each component's logged outage length (``down_s`` of its recovery line)."""
    found = []
    for name, text in sorted(outputs.items()):
        match = re.search(r"(?:relay\.recovered|worker\.redis_restored) .*?down_s=([0-9.]+)", text)
        if match:
            found.append(f"{name.removesuffix('.log')} {float(match.group(1)):.2f}s")
    return found


async def test_limits_hold_and_every_task_ends_once_across_a_sentinel_failover(
    database_url: str, engine: AsyncEngine, group: SentinelGroup, tmp_path: Path
) -> None:
    reader = create_read_session_factory(engine)
    writer = create_session_factory(engine)
    api_port = free_port()
    env = stack_env(
        database_url,
        # Only the scheme and database are used: the sentinels name the master.
        "redis://sentinel-managed.invalid:1/0",
        api_port,
        REDIS_SENTINELS=group.setting,
        REDIS_SENTINEL_SERVICE=SENTINEL_SERVICE,
        RELAY_RATE=str(RATE),
        RELAY_BURST=str(BURST),
        RELAY_CLAIM_LEASE_S="1",
        RECONCILE_INTERVAL_S="0.5",
        WORKER_LEASE_S="1.5",
        WORKER_SHUTDOWN_GRACE_S="1",
    )
    old_master = group.master.port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as http:
        with cluster(env=env, log_dir=tmp_path) as running:
            running.start("api")
            for module in ("worker", "worker", "relay", "relay"):
                running.start(module)

            async def ready() -> bool:
                _check_alive(running)
                try:
                    return (await http.get("/readyz")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(ready, timeout_s=60, message="the api to be ready")

            async def workers_up() -> bool:
                _check_alive(running)
                workers = [c for c in running.components if c.module == "worker"]
                return all("worker.ready" in worker.output() for worker in workers)

            await wait_for(workers_up, timeout_s=60, message="the workers to connect")

            started_at = time.time()

            def promoted() -> bool:
                return group.master_port() == group.replica.port

            async def fail_over() -> tuple[float, float]:
                """SIGKILL the master mid-run; the moments of the kill and the promotion."""
                await asyncio.sleep(KILL_AFTER_S)
                _check_alive(running)
                group.master.kill()
                killed = time.time()
                await wait_for(
                    lambda: asyncio.to_thread(promoted), timeout_s=30, message="the failover"
                )
                return killed, time.time()

            (killed, promoted_at), api_ids, direct_ids = await asyncio.gather(
                fail_over(), _post(http, VIA_API), _insert(writer, DIRECT)
            )
            task_ids = api_ids + direct_ids

            async def settled() -> bool:
                _check_alive(running)
                async with reader() as session:
                    statuses = list(
                        await session.scalars(select(Task.status).where(Task.id.in_(task_ids)))
                    )
                return len(statuses) == len(task_ids) and all(
                    status in TERMINAL_STATUSES for status in statuses
                )

            await wait_for(
                settled,
                timeout_s=SETTLE_TIMEOUT_S,
                interval_s=0.2,
                message="every task terminal after the failover",
            )
            settled_at = time.time()
            # The api's own Redis client (readiness) found the new master too.
            await wait_for(ready, timeout_s=10, message="the api ready on the new master")
            outputs = {c.log_path.name: c.output() for c in running.components}
            generation = _generation(group)

    async with reader() as session:
        statuses: dict[str, str] = {
            task_id: status
            for task_id, status in await session.execute(
                select(Task.id, Task.status).where(Task.id.in_(task_ids))
            )
        }
        rows = await session.execute(
            select(TaskEvent.task_id, TaskEvent.event, TaskEvent.at).order_by(TaskEvent.id)
        )
        history: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for task_id, event, at in rows:
            history[task_id].append((event, at.timestamp()))

    queued = sorted(at for story in history.values() for event, at in story if event == "queued")
    worst = {window: max_in_window(queued, window) for window in WINDOWS_S}
    requeued = sum(1 for s in history.values() for event, _ in s if event == EventKind.REQUEUED)
    gap = [at for at in queued if killed <= at <= promoted_at + 5]
    after_promotion = [at for at in queued if at >= promoted_at]
    print(
        f"\nmaster :{old_master} SIGKILLed {killed - started_at:.2f}s after the first "
        f"submission; replica :{group.replica.port} promoted {promoted_at - killed:.2f}s later "
        f"(polled); outages as logged: {', '.join(_outages(outputs))}; "
        "first release after the kill "
        f"{(gap[0] - killed) if gap else float('nan'):.2f}s after it, the first after the "
        f"promotion {(after_promotion[0] - promoted_at) if after_promotion else float('nan'):.2f}s "
        f"after that (bucket generation {generation[1]}); {requeued} requeued; "
        f"settled {settled_at - started_at:.1f}s after the first submission\n"
        "worst windows: "
        + ", ".join(f"{w}s {n} (bound {RATE * w + BURST:g})" for w, n in worst.items())
    )

    # Every accepted task ends exactly once, and succeeded (greetings are retriable).
    assert set(statuses) == set(task_ids)
    assert Counter(statuses.values()) == {TaskStatus.SUCCEEDED: len(task_ids)}
    for task_id in task_ids:
        kinds = Counter(event for event, _ in history[task_id])
        assert sum(kinds[k] for k in TERMINAL_STATUSES) == 1, (task_id, history[task_id])
        assert kinds[EventKind.SUBMITTED] == 1, history[task_id]
    # The rate held over every window, the failover included.
    for window, count in worst.items():
        assert count <= RATE * window + BURST, (window, count, worst)
    # The new master's buckets are a new generation: takes the old master had not
    # replicated cannot be granted again (throttler.throttle).
    assert generation[0] == generation[2], generation
    assert generation[1] >= 2, generation
    # Relays and workers lost Redis and found the new master (not a quiet run).
    for name, text in outputs.items():
        if name.startswith("relay"):
            assert "relay.unavailable" in text, text[-3000:]
            assert "relay.recovered" in text, text[-3000:]
        if name.startswith("worker"):
            assert "worker.redis_unavailable" in text, text[-3000:]
            assert "worker.redis_restored" in text, text[-3000:]
    assert killed - started_at < max(queued) - started_at, "the kill came after the last release"
