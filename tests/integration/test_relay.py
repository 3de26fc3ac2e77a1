"""The relay in process against a real database and a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, cast

import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.constants import job_key_prefix
from arq.jobs import Job
from sqlalchemy import select

from relay.relay import Batch, Relay
from tests.integration.test_relay_flow import outbox_of
from tests.support import (
    event_history,
    job_ids,
    record_success,
    start_attempt,
    submit_task,
    wait_for,
)
from throttler.db import SessionFactory, create_engine, create_session_factory
from throttler.job_ids import Dispatch
from throttler.limits import RuleSet
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.outbox import ClaimedTask, CoreClaim
from throttler.throttle import Limiter, RedisLimiter, UnlimitedLimiter, build_limiter

if TYPE_CHECKING:
    from relay.relay import Handover

NAMES = ("greeting", "download", "blocking_long_running_task", "non_blocking_long_running_task")


@pytest.fixture
async def arq(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    yield pool
    await pool.aclose()


async def _submit(sessions: SessionFactory, count: int) -> list[str]:
    ids = []
    async with sessions.begin() as session:
        for index in range(count):
            task = await submit_task(
                session,
                name=NAMES[index % len(NAMES)],
                account="default",
                payload={"index": index},
                now=utcnow(),
            )
            ids.append(task.id)
    return ids


def _relay(
    settings: Settings,
    sessions: SessionFactory,
    arq: ArqRedis,
    *,
    limiter: Limiter | None = None,
    relay_type: type[Relay] = Relay,
    **overrides: object,
) -> Relay:
    return relay_type(
        # A fresh object, not model_copy: that would carry over a cached limit_rules.
        settings=Settings(**{**settings.model_dump(), **overrides}),
        outbox=outbox_of(settings, sessions),
        arq=arq,
        limiter=limiter or UnlimitedLimiter(),
    )


async def _statuses(sessions: SessionFactory) -> dict[str, str]:
    async with sessions() as session:
        rows = await session.execute(select(Task.id, Task.status))
        return {task_id: status for task_id, status in rows}


async def _outbox_size(sessions: SessionFactory) -> int:
    async with sessions() as session:
        return await CoreClaim(session).count_rows()


async def _run_until_drained(relay: Relay, sessions: SessionFactory) -> None:
    running = asyncio.create_task(relay.run())
    try:
        await wait_for(lambda: _is_empty(sessions), timeout_s=10, message="the outbox to drain")
    finally:
        relay.stop()
        await asyncio.wait_for(running, timeout=5)


async def _is_empty(sessions: SessionFactory) -> bool:
    return await _outbox_size(sessions) == 0


async def test_relay_drains_the_outbox_into_arq(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 7)
    relay = _relay(settings, sessions, arq, relay_batch_size=3)
    await _run_until_drained(relay, sessions)

    async with sessions() as session:
        jobs = await job_ids(session, ids)
    # One job per task, its id naming the dispatch: the task and its release moment.
    assert set(await arq.zrange(settings.arq_queue_name, 0, -1)) == {
        job.encode() for job in jobs.values()
    }
    async with sessions() as session:
        tasks = {task.id: task for task in (await session.execute(select(Task))).scalars()}
        for task_id in ids:
            task = tasks[task_id]
            assert task.queued_at is not None
            assert jobs[task_id] == Dispatch.of(task_id, queued_at=task.queued_at).job_id
            info = await Job(jobs[task_id], arq).info()
            assert info is not None
            # The ARQ function is the task name; the payload stays in the database.
            assert (info.function, info.args, info.kwargs) == (task.name, (), {})
            assert task.status == TaskStatus.QUEUED
            assert task.queued_at is not None
            assert task.queued_at >= task.created_at
            assert await event_history(session, task_id) == ["submitted", "queued"]


class _Recording(Relay):
    """Remembers every claim it hands to ARQ."""

    handed: list[ClaimedTask]

    async def enqueue(
        self, claims: Sequence[ClaimedTask], *, run_at: Sequence[datetime | None] = ()
    ) -> Handover:
        self.__dict__.setdefault("handed", []).extend(claims)
        return await super().enqueue(claims, run_at=run_at)


async def test_recovered_lease_is_not_enqueued_twice(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 4)
    # A relay that claimed and enqueued, then died before releasing its rows.
    dead = _relay(settings, sessions, arq, relay_claim_lease_s=0.2)
    batch = await dead.claim()
    handed = await dead.enqueue(batch.to_enqueue, run_at=batch.run_at)
    assert (handed.enqueued, handed.errors) == (set(ids), [])
    async with sessions() as session:
        jobs = await job_ids(session, ids)
    first_enqueue = {task_id: (await Job(jobs[task_id], arq).info()) for task_id in ids}

    # The lapsed leases come back as queued tasks and go to ARQ again, where they are no-ops.
    successor = _relay(settings, sessions, arq, relay_type=_Recording)
    assert isinstance(successor, _Recording)
    successor.clock = lambda: utcnow() + timedelta(seconds=1)
    await successor.step()
    await successor.flush()
    assert sorted(c.task_id for c in successor.handed) == sorted(ids)
    assert {c.status for c in successor.handed} == {TaskStatus.QUEUED}

    assert await _outbox_size(sessions) == 0
    assert await arq.zcard(settings.arq_queue_name) == len(ids)
    async with sessions() as session:
        for task_id in ids:
            # Same job as before (same id): same enqueue time; one queued event.
            assert await Job(jobs[task_id], arq).info() == first_enqueue[task_id]
            assert await event_history(session, task_id) == ["submitted", "queued"]

    # A second pass over an empty outbox enqueues nothing.
    assert (await successor.claim()).to_enqueue == ()


async def test_finished_task_with_stale_row_is_released_not_enqueued(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    (task_id,) = await _submit(sessions, 1)
    dead = _relay(settings, sessions, arq, relay_claim_lease_s=0.01)
    await dead.claim()
    async with sessions.begin() as session:
        attempt = await start_attempt(session, task_id=task_id, worker_id="w", now=utcnow())
        assert attempt is not None
        await record_success(
            session, task_id=task_id, result={}, attempt=1, worker_id="w", now=utcnow()
        )
    successor = _relay(settings, sessions, arq)
    successor.clock = lambda: utcnow() + timedelta(seconds=1)
    batch = await successor.claim()
    assert batch.to_enqueue == ()
    assert await _outbox_size(sessions) == 0
    assert await arq.zcard(settings.arq_queue_name) == 0


async def test_max_inflight_caps_queued_tasks(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 10)
    relay = _relay(settings, sessions, arq, relay_max_inflight=3, relay_batch_size=2)

    async def queued() -> list[str]:
        statuses = await _statuses(sessions)
        return [i for i in ids if statuses[i] == TaskStatus.QUEUED]

    for _ in range(4):
        await relay.step()
    await relay.flush()
    assert await queued() == ids[:3]
    assert await arq.zcard(settings.arq_queue_name) == 3

    # A task finishing frees one slot, and only one.
    async with sessions.begin() as session:
        await start_attempt(session, task_id=ids[0], worker_id="w", now=utcnow())
        await record_success(
            session, task_id=ids[0], result={}, attempt=1, worker_id="w", now=utcnow()
        )
    for _ in range(3):
        await relay.step()
    await relay.flush()
    assert await queued() == ids[1:4]
    assert await arq.zcard(settings.arq_queue_name) == 4
    assert await _outbox_size(sessions) == 6


async def test_rate_limited_claim_leases_only_what_is_admitted(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 5)
    limiter = RedisLimiter(redis=arq, rules=RuleSet.parse("cluster rate=0.6/m burst=2"))
    relay = _relay(settings, sessions, arq, limiter=limiter)
    batch = await relay.claim()
    assert [c.task_id for c in batch.to_enqueue] == ids[:2]
    # Next token in 100 s: the relay sleeps until then rather than polling.
    assert (batch.next_step_at - relay.clock()).total_seconds() > 90
    async with sessions() as session:
        unleased = await session.scalar(
            select(OutboxEntry.id).where(OutboxEntry.claimed_by.is_(None)).limit(1)
        )
        assert unleased is not None
    assert sorted((await _statuses(sessions)).values()).count(TaskStatus.QUEUED) == 2


class _StoppedMidBatch(Relay):
    """Receives its stop request right after its first claim, as a SIGTERM would arrive."""

    async def claim(self) -> Batch:
        batch = await super().claim()
        self.stop()
        return batch


async def test_stop_finishes_the_batch_in_hand(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 8)
    relay = _relay(settings, sessions, arq, relay_type=_StoppedMidBatch, relay_batch_size=5)
    await asyncio.wait_for(relay.run(), timeout=5)
    # The first batch went all the way (enqueued and released); nothing else started.
    assert await arq.zcard(settings.arq_queue_name) == 5
    assert await _outbox_size(sessions) == 3
    async with sessions() as session:
        leased = await session.scalar(
            select(OutboxEntry.id).where(OutboxEntry.claimed_by.is_not(None)).limit(1)
        )
        assert leased is None
    statuses = await _statuses(sessions)
    assert [statuses[i] for i in ids] == ["queued"] * 5 + ["pending"] * 3


async def test_redis_outage_is_logged_once_and_retried(
    settings: Settings,
    sessions: SessionFactory,
    closed_port: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _submit(sessions, 2)
    broken = ArqRedis.from_url(f"redis://127.0.0.1:{closed_port}/0")
    try:
        # A short lease so the failed claims come back and fail again.
        relay = _relay(settings, sessions, broken, relay_claim_lease_s=0.05)
        running = asyncio.create_task(relay.run())
        with caplog.at_level(logging.DEBUG, logger="relay"):

            async def retried() -> bool:
                return sum(r.getMessage() == "relay.error" for r in caplog.records) >= 2

            await wait_for(retried, message="two retries")
        relay.stop()
        await asyncio.wait_for(running, timeout=5)
    finally:
        await broken.aclose()
    messages = [record.getMessage() for record in caplog.records]
    # One line at the change of state; the retries after it are DEBUG only.
    assert messages.count("relay.unavailable") == 1
    assert all(
        record.levelno == logging.DEBUG
        for record in caplog.records
        if record.getMessage() == "relay.error"
    )
    # The claims stay leased until the lease lapses; nothing was lost.
    assert await _outbox_size(sessions) == 2


async def test_relay_rides_out_a_database_outage_and_resumes(
    settings: Settings,
    sessions: SessionFactory,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    if not settings.is_sqlite:
        pytest.skip("the outage is made by holding SQLite's write lock")
    path = settings.database_url.removeprefix("sqlite+aiosqlite:///")
    task_ids = await _submit(sessions, 3)
    impatient = Settings(**{**settings.model_dump(), "database_timeout_s": 0.1})
    engine = create_engine(impatient)
    arq = ArqRedis.from_url(redis_url)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        relay = _relay(impatient, create_session_factory(engine), arq)
        running = asyncio.create_task(relay.run())
        with caplog.at_level(logging.INFO, logger="relay"):

            async def noticed() -> bool:
                return any(r.getMessage() == "relay.unavailable" for r in caplog.records)

            await wait_for(noticed, message="the relay to notice the outage")
            assert not running.done()
            blocker.execute("ROLLBACK")

            async def recovered() -> bool:
                return any(r.getMessage() == "relay.recovered" for r in caplog.records)

            await wait_for(recovered, message="the relay to recover")

            async def all_queued() -> bool:
                async with sessions() as session:
                    jobs = await job_ids(session, task_ids)
                found = await arq.exists(*(job_key_prefix + job for job in jobs.values()))
                return bool(found == len(task_ids))

            await wait_for(all_queued, message="the tasks to reach ARQ")
        relay.stop()
        await asyncio.wait_for(running, timeout=5)
    finally:
        blocker.close()
        await arq.aclose()
        await engine.dispose()


async def test_rate_limited_relay_spaces_dispatches_by_the_token_interval(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    await _submit(sessions, 10)
    limiter = build_limiter(redis=arq, rules=RuleSet.parse("cluster rate=20/s"))
    relay = _relay(settings, sessions, arq, limiter=limiter, relay_rate=20.0, relay_burst=1)
    await _run_until_drained(relay, sessions)

    async with sessions() as session:
        tasks = (await session.execute(select(Task).order_by(Task.queued_at))).scalars().all()
    queued_at = {task.id: task.queued_at.timestamp() for task in tasks if task.queued_at}
    times = list(queued_at.values())
    # On the bucket's clock the dispatches are one token interval apart: never closer, and
    # exactly that while the relay keeps up (it takes tokens ahead). A claim that comes
    # late on a loaded machine finds the bucket full, and its task goes later (0.28 s seen
    # under the suite), never sooner.
    gaps = [round(b - a, 4) for a, b in itertools.pairwise(times)]
    assert len(gaps) == 9
    assert all(gap >= 0.05 for gap in gaps), gaps
    assert gaps.count(0.05) > len(gaps) // 2, gaps
    async with sessions() as session:
        jobs = await job_ids(session, queued_at)
    for task_id, at in queued_at.items():
        info = await Job(jobs[task_id], arq).info()
        assert info is not None
        # Runnable in ARQ from the moment its token fell due, not before (ARQ keeps ms).
        assert info.score is not None
        assert info.score == pytest.approx(at * 1000, abs=1)


async def _arrival_ms(arq: ArqRedis, job_id: str) -> tuple[int, int]:
    """When the job's enqueue ran in Redis, and its score (ms): from Redis itself.

    The enqueue sets the job key's expiry to ``score - enqueue_time + expires_extra_ms``
    from the moment it runs (ARQ's rule), so Redis's absolute expiry, less that, is the
    moment the job (and its ZADD, in the same atomic call) reached Redis.
    """
    info = await Job(job_id, arq).info()
    assert info is not None
    assert info.score is not None
    # redis-py types PEXPIRETIME as sync only.
    expiry = cast("Awaitable[int]", arq.pexpiretime(job_key_prefix + job_id))
    expires_at_ms = int(await expiry)
    enqueue_time_ms = round(info.enqueue_time.timestamp() * 1000)
    ttl_ms = info.score - enqueue_time_ms + arq.expires_extra_ms
    return expires_at_ms - ttl_ms, info.score


async def _queued_at_ms(sessions: SessionFactory) -> dict[str, int]:
    async with sessions() as session:
        rows = await session.execute(select(Task.id, Task.queued_at))
        return {task_id: round(at.timestamp() * 1000) for task_id, at in rows if at is not None}


async def test_rate_limited_jobs_reach_arq_before_their_moment(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 20)
    limiter = build_limiter(redis=arq, rules=RuleSet.parse("cluster rate=50/s"))
    relay = _relay(settings, sessions, arq, limiter=limiter, relay_rate=50.0, relay_burst=1)
    await _run_until_drained(relay, sessions)

    queued_at = await _queued_at_ms(sessions)
    async with sessions() as session:
        jobs = await job_ids(session, ids)
    for task_id in ids:
        reached_ms, score_ms = await _arrival_ms(arq, jobs[task_id])
        # In Redis no later than its moment however loaded the machine (a job that came
        # late was given a new moment), so ARQ runs it then, not late and bunched.
        assert reached_ms <= score_ms
        # Runnable at its queued_at (a re-timed task's too), not before.
        assert score_ms == pytest.approx(queued_at[task_id], abs=1)


class _Stalled(Relay):
    """Hands its first batch to ARQ only once every moment in it has passed.

    As a relay starved of CPU (or stopped) between its claim and its enqueue.
    """

    stalled = False

    async def enqueue(
        self, claims: Sequence[ClaimedTask], *, run_at: Sequence[datetime | None] = ()
    ) -> Handover:
        if not self.stalled:
            self.stalled = True
            last_s = max(at.timestamp() for at in run_at if at is not None)

            async def passed() -> bool:
                seconds, micros = await self.arq.time()
                return bool(seconds + micros / 1e6 > last_s + 0.1)

            await wait_for(passed, message="the batch's moments to pass")
        return await super().enqueue(claims, run_at=run_at)


async def test_a_relay_late_with_its_batch_releases_later_never_bunched(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    rate = 20.0
    ids = await _submit(sessions, 22)
    rules = RuleSet.parse(f"cluster rate={rate:g}/s burst=1")

    def relay(relay_type: type[Relay]) -> Relay:
        limiter = build_limiter(redis=arq, rules=rules)
        return _relay(
            settings,
            sessions,
            arq,
            limiter=limiter,
            relay_type=relay_type,
            relay_rate=rate,
            relay_burst=1,
        )

    stalled, other = relay(_Stalled), relay(Relay)
    # The stalled relay claims a batch and holds it past its moments; meanwhile another
    # relay takes the next tokens and hands its tasks over on time.
    await stalled.step()
    running = asyncio.create_task(other.run())
    try:
        await stalled.flush()
        await wait_for(lambda: _is_empty(sessions), timeout_s=30, message="the outbox to drain")
    finally:
        other.stop()
        await asyncio.wait_for(running, timeout=10)

    queued_at = await _queued_at_ms(sessions)
    async with sessions() as session:
        jobs = await job_ids(session, ids)
    arrivals = {task_id: await _arrival_ms(arq, jobs[task_id]) for task_id in ids}
    # Every job reached Redis (its ZADD ran) no later than its score: none runnable late.
    late = {i: (at, score) for i, (at, score) in arrivals.items() if at > score}
    assert late == {}
    # So the runnable moments, max(ZADD time, score), are the granted ones: one token
    # interval apart (less ARQ's rounding to ms), both relays' together.
    runnable = sorted(max(at, score) for at, score in arrivals.values())
    assert min(b - a for a, b in itertools.pairwise(runnable)) >= 1000 / rate - 1
    # And each task's queued_at, and its one queued event, is its job's moment (the late
    # ones' new one).
    async with sessions() as session:
        rows = await session.execute(
            select(TaskEvent.task_id, TaskEvent.at).where(TaskEvent.event == "queued")
        )
        events = [(task_id, round(at.timestamp() * 1000)) for task_id, at in rows]
    assert sorted(task_id for task_id, _ in events) == sorted(ids)
    for task_id, at in events:
        assert arrivals[task_id][1] == pytest.approx(queued_at[task_id], abs=1)
        assert at == queued_at[task_id]


async def test_late_jobs_of_a_relay_that_died_come_back_with_their_lease(
    settings: Settings, sessions: SessionFactory, arq: ArqRedis
) -> None:
    ids = await _submit(sessions, 3)
    rules = RuleSet.parse("cluster rate=20/s burst=1")
    dead = _relay(
        settings,
        sessions,
        arq,
        limiter=build_limiter(redis=arq, rules=rules),
        relay_type=_Stalled,
        relay_rate=20.0,
        relay_burst=1,
        relay_claim_lease_s=0.2,
    )
    # It claims, comes to Redis after the moments, is told so, and dies before retiming.
    batch = await dead.claim()
    handed = await dead.enqueue(batch.to_enqueue, run_at=batch.run_at)
    assert handed.enqueued == set()
    assert sorted(c.task_id for c in handed.late) == sorted(ids)
    assert await arq.zcard(settings.arq_queue_name) == 0

    # Once the lease lapses, another relay claims the rows and admits them afresh.
    successor = _relay(
        settings,
        sessions,
        arq,
        limiter=build_limiter(redis=arq, rules=rules),
        relay_rate=20.0,
        relay_burst=1,
    )
    await _run_until_drained(successor, sessions)
    queued_at = await _queued_at_ms(sessions)
    async with sessions() as session:
        jobs = await job_ids(session, ids)
    for task_id in ids:
        reached_ms, score_ms = await _arrival_ms(arq, jobs[task_id])
        assert reached_ms <= score_ms
        # A re-claimed queued task keeps its first queued_at; it goes later, never sooner.
        assert score_ms >= queued_at[task_id]
    async with sessions() as session:
        for task_id in ids:
            assert await event_history(session, task_id) == ["submitted", "queued"]
