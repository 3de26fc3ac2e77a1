"""The relay wakes on announced work instead of waiting out its poll; Redis outages pass."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix
from redis.asyncio import Redis

from devtools.redis_server import start_redis_server
from relay.__main__ import wakeup_channels
from relay.relay import Relay
from tests.integration.test_relay_flow import outbox_of
from tests.support import job_ids, submit_greetings, wait_for
from throttler.constants import FINISHED_CHANNEL, SUBMITTED_CHANNEL
from throttler.db import SessionFactory
from throttler.settings import Settings
from throttler.throttle import UnlimitedLimiter
from throttler.wakeup import WakeupListener, announce_new_work

# Far longer than any wait below: only a wakeup can make the relay look again in time.
SLOW_POLL_S = 60.0


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


class _Counting(Relay):
    steps = 0

    async def step(self) -> datetime:
        next_step_at = await super().step()
        self.steps += 1
        return next_step_at


async def _subscribed(redis: Redis, channel: str) -> bool:
    counts = dict(await redis.pubsub_numsub(channel))
    return bool(counts.get(channel.encode()))


async def test_an_announcement_wakes_an_idle_relay(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    slow = Settings(**{**settings.model_dump(), "relay_poll_interval_s": SLOW_POLL_S})
    relay = _Counting(
        settings=slow, outbox=outbox_of(slow, sessions), arq=arq, limiter=UnlimitedLimiter()
    )
    listener = WakeupListener(redis=arq, channels=wakeup_channels(relay), on_message=relay.wake)
    running = [asyncio.create_task(relay.run()), asyncio.create_task(listener.run())]
    try:
        await wait_for(lambda: _subscribed(arq, SUBMITTED_CHANNEL), message="the subscription")

        async def idle() -> bool:
            return relay.steps >= 1

        # The relay has looked at the empty outbox and now sleeps for its long poll.
        await wait_for(idle, message="the relay's first, empty step")
        (task_id,) = await submit_greetings(sessions, 1)
        await announce_new_work(arq)

        async def enqueued() -> bool:
            async with sessions() as session:
                job = (await job_ids(session, [task_id]))[task_id]
            return bool(await arq.exists(job_key_prefix + job))

        await wait_for(enqueued, timeout_s=SLOW_POLL_S / 4, message="the task to reach ARQ")
    finally:
        relay.stop()
        listener.stop()
        await asyncio.wait_for(asyncio.gather(*running), timeout=5)


async def test_finished_tasks_wake_the_relay_only_when_a_cap_waits_for_them(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    def channels(**overrides: object) -> list[str]:
        relay = Relay(
            settings=Settings(**{**settings.model_dump(), **overrides}),
            outbox=outbox_of(settings, sessions),
            arq=arq,
            limiter=UnlimitedLimiter(),
        )
        return wakeup_channels(relay)

    assert channels() == [SUBMITTED_CHANNEL]
    assert channels(relay_max_inflight=5) == [SUBMITTED_CHANNEL, FINISHED_CHANNEL]
    assert channels(relay_limits="account:* inflight=2") == [SUBMITTED_CHANNEL, FINISHED_CHANNEL]
    assert channels(relay_max_queue_depth=100) == [SUBMITTED_CHANNEL, FINISHED_CHANNEL]


async def test_the_listener_rides_out_a_redis_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = start_redis_server(workdir=tmp_path / "redis")
    client = Redis.from_url(server.url)
    heard: list[int] = []
    listener = WakeupListener(
        redis=client,
        channels=[SUBMITTED_CHANNEL],
        on_message=lambda: heard.append(1),
        poll_s=0.05,
        backoff_max_s=0.2,
    )
    running = asyncio.create_task(listener.run())
    try:
        with caplog.at_level(logging.INFO, logger="throttler.wakeup"):
            await wait_for(lambda: _subscribed(client, SUBMITTED_CHANNEL), message="subscribed")
            server.stop()

            async def logged(event: str) -> bool:
                return any(record.getMessage() == event for record in caplog.records)

            await wait_for(lambda: logged("wakeup.unsubscribed"), message="the outage noticed")
            server = start_redis_server(port=server.port, workdir=tmp_path / "redis")
            await wait_for(lambda: logged("wakeup.resubscribed"), message="resubscribed")

            async def heard_one() -> bool:
                await announce_new_work(client)
                return bool(heard)

            await wait_for(heard_one, message="an announcement after the restart")
        assert [r.getMessage() for r in caplog.records].count("wakeup.unsubscribed") == 1
    finally:
        listener.stop()
        await asyncio.wait_for(running, timeout=5)
        await client.aclose()
        server.stop()
