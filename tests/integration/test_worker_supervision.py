"""The worker's supervisor restarts ARQ's loop after Redis errors, with backoff."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import cast

from redis.asyncio import Redis
from redis.exceptions import ResponseError

from devtools.redis_server import free_port
from tests.support import wait_for
from throttler.retry import Backoff
from throttler.settings import Settings
from worker.leases import LeasedWorker
from worker.service import Supervision, WorkerService

CAP_S = 0.08


class LoopFailingWhileRedisAnswers:
    """Stands in for a LeasedWorker whose ARQ loop fails at once with an error Redis
    answers (a full or read-only Redis), while PING keeps working."""

    def __init__(self, pool: Redis) -> None:
        self.pool = pool
        self.main_task: asyncio.Task[None] | None = None
        self.starts: list[float] = []

    async def main(self) -> None:
        self.starts.append(time.monotonic())
        raise ResponseError("OOM command not allowed when used memory > 'maxmemory'.")


async def test_a_loop_that_fails_while_redis_answers_backs_off_instead_of_spinning(
    redis: Redis, redis_url: str
) -> None:
    supervision = Supervision(
        shutdown_grace_s=1.0, redis_reconnect=Backoff(first_s=0.01, max_s=CAP_S)
    )
    service = WorkerService(Settings(redis_url=redis_url), supervision=supervision)
    worker = LoopFailingWhileRedisAnswers(redis)
    supervising = asyncio.create_task(service._supervise(cast(LeasedWorker, worker)))

    async def restarted_often() -> bool:
        return len(worker.starts) >= 8

    await wait_for(restarted_often, message="eight starts of the loop")
    service.request_stop()
    await asyncio.wait_for(supervising, timeout=5)

    gaps_s = [later - earlier for earlier, later in itertools.pairwise(worker.starts)]
    # 0.01, 0.02, 0.04, then the cap: the pause grows although every ping succeeds.
    assert all(gap_s >= CAP_S * 0.9 for gap_s in gaps_s[3:7]), gaps_s
    # Redis is judged by the ping, not by the loop's error: no outage, a failing loop.
    assert not service.redis_outage.down
    assert service.loop_failing.down


async def test_a_stop_ends_the_wait_for_redis_at_once() -> None:
    # Nothing listens there: the loop fails and so does the ping, a Redis outage.
    redis_url = f"redis://127.0.0.1:{free_port()}/0"
    supervision = Supervision(shutdown_grace_s=1.0, redis_reconnect=Backoff(first_s=30, max_s=30))
    service = WorkerService(Settings(redis_url=redis_url), supervision=supervision)
    worker = LoopFailingWhileRedisAnswers(Redis.from_url(redis_url))
    try:
        supervising = asyncio.create_task(service._supervise(cast(LeasedWorker, worker)))

        async def failed_once() -> bool:
            return bool(worker.starts)

        await wait_for(failed_once, message="the loop to fail")
        started = time.monotonic()
        service.request_stop()
        await asyncio.wait_for(supervising, timeout=5)
        assert time.monotonic() - started < 5
        assert service.redis_outage.down
    finally:
        await worker.pool.aclose()
