"""``python -m relay`` as a real process: its rate bound, crash safety, signals, settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from arq.jobs import Job
from redis.asyncio import Redis
from sqlalchemy import func, select

from bench.figures import max_in_window
from tests.acceptance.processes import cluster
from tests.support import (
    ROOT,
    event_history,
    event_times,
    submit_greetings,
    submit_task,
    wait_for,
)
from throttler.db import SessionFactory
from throttler.job_ids import Dispatch
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.outbox import CoreClaim

pytestmark = pytest.mark.slow

QUEUE = "arq:queue"


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": settings.database_url, "REDIS_URL": settings.redis_url, **extra}


async def _queue_size(redis: Redis) -> int:
    return int(await redis.zcard(QUEUE))


async def _leased_task_ids(sessions: SessionFactory) -> set[str]:
    async with sessions() as session:
        rows = await session.execute(
            select(OutboxEntry.task_id).where(OutboxEntry.claimed_by.is_not(None))
        )
        return set(rows.scalars())


async def test_relay_dispatches_at_the_configured_rate(
    settings: Settings, sessions: SessionFactory, redis: Redis, tmp_path: Path
) -> None:
    await submit_greetings(sessions, 200)
    env = _env(settings, RELAY_RATE="50", RELAY_BURST="1")
    with cluster(env=env, log_dir=tmp_path) as running:
        relay = running.start("relay")

        async def all_queued() -> bool:
            return await _queue_size(redis) == 200

        # Watch Redis, not the database, so the test takes no SQLite write lock meanwhile.
        await wait_for(all_queued, timeout_s=30, interval_s=0.1, message="200 enqueued tasks")
        assert relay.stop() == 0

    async with sessions() as session:
        times = sorted(await event_times(session, "queued"))
    span_s = times[-1] - times[0]
    worst = max_in_window(times, 1.0)
    # The first token is there at once, then one every 20 ms: 199 / 50 = 3.98 s.
    rate_error = (199 / span_s) / 50 - 1
    report = f"span_s={span_s:.3f} rate_error={rate_error:+.2%} worst_1s_window={worst}"
    print(report)  # the figures, shown with -s
    assert len(times) == 200
    assert 3.7 <= span_s <= 4.3, report
    assert worst <= 51, report
    assert "relay.dispatched" in relay.output()


async def test_relay_killed_before_release_loses_and_repeats_nothing(
    settings: Settings, sessions: SessionFactory, redis: Redis, tmp_path: Path
) -> None:
    ids = await submit_greetings(sessions, 20)
    env = _env(settings, RELAY_BATCH_SIZE="5", RELAY_CLAIM_LEASE_S="1")
    with cluster(env=env, log_dir=tmp_path) as running:
        crashing = running.start("tests.acceptance.crashing_relay")
        assert crashing.process.wait(timeout=30) == -9, crashing.output()

        # Died after handing its first batch (perhaps two) to ARQ, before releasing a row.
        first_jobs = {
            job_id.decode(): await Job(job_id.decode(), redis).info()
            for job_id in await redis.zrange(QUEUE, 0, -1)
        }
        assert len(first_jobs) >= 5
        assert {Dispatch.parse(job).task_id for job in first_jobs} <= await _leased_task_ids(
            sessions
        )
        async with sessions() as session:
            assert await CoreClaim(session).count_rows() == 20

        relay = running.start("relay")

        async def drained() -> bool:
            async with sessions() as session:
                return await CoreClaim(session).count_rows() == 0

        # The dead relay's leases lapse after 1 s; the new relay then takes those rows too.
        await wait_for(drained, timeout_s=30, interval_s=0.1, message="the outbox to drain")
        assert relay.stop() == 0

    queue = [job_id.decode() for job_id in await redis.zrange(QUEUE, 0, -1)]
    # One job per task: the repeat enqueue of a recovered lease has the same job id.
    assert sorted(Dispatch.parse(job).task_id for job in queue) == sorted(ids)
    for job_id, info in first_jobs.items():
        # Not enqueued a second time: the job is still the one the dead relay wrote.
        assert await Job(job_id, redis).info() == info
    async with sessions() as session:
        for task_id in ids:
            assert await event_history(session, task_id) == ["submitted", "queued"]
        statuses = set((await session.execute(select(Task.status))).scalars())
        assert statuses == {TaskStatus.QUEUED}


async def test_sigterm_finishes_the_batch_and_exits_zero(
    settings: Settings, sessions: SessionFactory, redis: Redis, tmp_path: Path
) -> None:
    await submit_greetings(sessions, 100)
    env = _env(settings, RELAY_RATE="20", RELAY_BURST="5")
    with cluster(env=env, log_dir=tmp_path) as running:
        relay = running.start("relay")

        async def some_queued() -> bool:
            return await _queue_size(redis) >= 10

        await wait_for(some_queued, timeout_s=30, message="a few enqueued tasks")
        assert relay.stop(timeout_s=5) == 0, relay.output()
    assert "relay.stopped" in relay.output()
    enqueued = await _queue_size(redis)
    # Every leased row was enqueued and released: the outbox holds exactly the rest.
    assert await _leased_task_ids(sessions) == set()
    async with sessions() as session:
        outbox = await CoreClaim(session).count_rows()
        queued = await session.scalar(
            select(func.count()).select_from(Task).where(Task.status == TaskStatus.QUEUED)
        )
    assert (outbox + enqueued, queued) == (100, enqueued)


def test_invalid_rate_exits_2_naming_the_variable(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "RELAY_RATE": "-1",
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
    }
    finished = subprocess.run(
        [sys.executable, "-m", "relay"], cwd=ROOT, env=env, capture_output=True, timeout=30
    )
    assert finished.returncode == 2
    assert b"RELAY_RATE" in finished.stderr


async def _queued_twice(sessions: SessionFactory) -> list[str]:
    async with sessions() as session:
        rows = await session.execute(
            select(TaskEvent.task_id)
            .where(TaskEvent.event == EventKind.QUEUED)
            .group_by(TaskEvent.task_id)
            .having(func.count() > 1)
        )
        return list(rows.scalars())


@pytest.mark.parametrize("kill_one", [False, True], ids=["both-live", "one-killed"])
async def test_two_relays_share_the_rate(
    settings: Settings,
    sessions: SessionFactory,
    redis: Redis,
    tmp_path: Path,
    kill_one: bool,
) -> None:
    await submit_greetings(sessions, 400)
    env = _env(settings, RELAY_RATE="40", RELAY_BURST="1", RELAY_CLAIM_LEASE_S="1")
    with cluster(env=env, log_dir=tmp_path) as running:
        first = running.start("relay")
        second = running.start("relay")
        if kill_one:

            async def half_queued() -> bool:
                return await _queue_size(redis) >= 200

            await wait_for(half_queued, timeout_s=30, interval_s=0.05, message="200 enqueued")
            second.kill()

        async def all_queued() -> bool:
            return await _queue_size(redis) == 400

        await wait_for(all_queued, timeout_s=40, interval_s=0.1, message="400 enqueued tasks")
        assert first.stop() == 0
        if not kill_one:
            assert second.stop() == 0
            assert "relay.dispatched" in second.output()

    async with sessions() as session:
        times = sorted(await event_times(session, "queued"))
        relays = {
            detail["relay"]
            for detail in (
                await session.execute(
                    select(TaskEvent.detail).where(TaskEvent.event == EventKind.QUEUED)
                )
            ).scalars()
        }
    span_s = times[-1] - times[0]
    worst = max_in_window(times, 1.0)
    rate_error = (399 / span_s) / 40 - 1
    report = (
        f"kill_one={kill_one} span_s={span_s:.3f} rate_error={rate_error:+.2%} "
        f"worst_1s_window={worst} relays={len(relays)}"
    )
    print(report)
    assert len(times) == 400
    assert await _queued_twice(sessions) == []
    assert len(relays) == 2, report  # both took their share
    assert 9.5 <= span_s <= 10.5, report
    assert worst <= 41, report


async def test_inflight_cap_holds_across_workers(
    settings: Settings, sessions: SessionFactory, redis: Redis, tmp_path: Path
) -> None:
    async with sessions.begin() as session:
        for _ in range(12):
            await submit_task(
                session,
                name="non_blocking_long_running_task",
                account="default",
                payload={"duration": 1},
                now=utcnow(),
            )
    env = _env(
        settings,
        RELAY_LIMITS="task:non_blocking_long_running_task inflight=3",
        WORKER_CONCURRENCY="5",
    )
    with cluster(env=env, log_dir=tmp_path) as running:
        running.start("worker")
        running.start("worker")
        running.start("relay")

        async def all_done() -> bool:
            async with sessions() as session:
                done = await session.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(Task.status == TaskStatus.SUCCEEDED)
                )
                return done == 12

        await wait_for(all_done, timeout_s=30, interval_s=0.1, message="12 tasks done")

    async with sessions() as session:
        rows = (
            await session.execute(
                select(TaskEvent.at, TaskEvent.event).where(
                    TaskEvent.event.in_([EventKind.QUEUED, EventKind.STARTED, EventKind.SUCCEEDED])
                )
            )
        ).all()
    # Running at once: +1 at each start, -1 at each success (ties: successes first).
    changes = sorted(
        (at.timestamp(), 0 if event == EventKind.SUCCEEDED else 1)
        for at, event in rows
        if event != EventKind.QUEUED
    )
    concurrent = peak = 0
    for _, kind in changes:
        concurrent += 1 if kind else -1
        peak = max(peak, concurrent)
    first_queued = min(at.timestamp() for at, event in rows if event == EventKind.QUEUED)
    last_done = max(at.timestamp() for at, event in rows if event == EventKind.SUCCEEDED)
    report = f"peak_running={peak} total_s={last_done - first_queued:.3f}"
    print(report)
    assert peak == 3, report
    assert last_done - first_queued < 8, report
