"""Nothing undoes a cancel: the worker's writes, the relay's claim and the reconciler are
guarded, on SQLite and PostgreSQL, for the reference store and each dialect's fast path.

A cancelled task is never started; an attempt's outcome changes only a task still running
on that attempt (a late outcome after a cancel, or after a cancel and a retry that is
running again, is discarded); a relay's claim marks only pending tasks queued; the
reconciler never looks at a cancelled task.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta

import pytest
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.worker_harness import load_task, queue_task
from tests.support import event_history, submit_task
from throttler.db import SessionFactory
from throttler.job_ids import Dispatch
from throttler.models import utcnow
from throttler.reconcile import reconcile_once
from throttler.settings import Settings
from throttler.statuses import EventKind
from throttler.store.attempts import Attempts, CoreAttempts, Outcome, open_attempts
from throttler.store.cancels import CancelOutcome, CancelStore
from throttler.store.outbox import open_outbox
from throttler.store.recovery import open_recovery
from throttler.store.retries import RetryStore

AttemptsFactory = Callable[[Settings, AsyncEngine], Attempts]
IMPLEMENTATIONS = {
    "reference": lambda settings, engine: CoreAttempts(engine),
    "fast_path": open_attempts,
}


@pytest.fixture(params=sorted(IMPLEMENTATIONS))
async def attempts(
    request: pytest.FixtureRequest, settings: Settings, engine: AsyncEngine
) -> AsyncIterator[Attempts]:
    store = IMPLEMENTATIONS[request.param](settings, engine)
    yield store
    await store.close()


def _succeeded(task_id: str, *, attempt: int) -> Outcome:
    return Outcome(
        task_id=task_id,
        event=EventKind.SUCCEEDED,
        attempt=attempt,
        worker_id="w",
        now=utcnow(),
        result={"message": "late"},
    )


async def _start(attempts: Attempts, sessions: SessionFactory, task_id: str) -> int | None:
    task = await load_task(sessions, task_id)
    written = await attempts.write(
        starts=[Dispatch.of(task_id, queued_at=task.queued_at)],
        outcomes=[],
        worker_id="w",
        now=utcnow(),
    )
    started = written.started.get(task_id)
    return None if started is None else started.attempt


async def _record(attempts: Attempts, outcome: Outcome) -> bool:
    written = await attempts.write(starts=[], outcomes=[outcome], worker_id="w", now=utcnow())
    return outcome.task_id in written.recorded


async def test_a_cancelled_queued_task_is_not_started(
    attempts: Attempts, engine: AsyncEngine, sessions: SessionFactory
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "x"})
    answer = await CancelStore(engine).cancel(task_id=task_id, account="default", now=utcnow())
    assert answer.outcome is CancelOutcome.CANCELLED

    assert await _start(attempts, sessions, task_id) is None

    task = await load_task(sessions, task_id)
    assert (task.status, task.attempts, task.started_at) == ("cancelled", 0, None)


async def test_a_cancelled_running_tasks_late_outcome_is_discarded(
    attempts: Attempts, engine: AsyncEngine, sessions: SessionFactory
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "x"})
    assert await _start(attempts, sessions, task_id) == 1
    await CancelStore(engine).cancel(task_id=task_id, account="default", now=utcnow())

    assert not await _record(attempts, _succeeded(task_id, attempt=1))

    task = await load_task(sessions, task_id)
    assert (task.status, task.result) == ("cancelled", None)
    async with sessions() as session:
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "started",
            "cancelled",
        ]


async def test_an_outcome_of_an_earlier_attempt_is_discarded_after_cancel_and_retry(
    attempts: Attempts, settings: Settings, engine: AsyncEngine, sessions: SessionFactory
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "x"})
    assert await _start(attempts, sessions, task_id) == 1
    await CancelStore(engine).cancel(task_id=task_id, account="default", now=utcnow())
    await RetryStore(engine).retry(task_id=task_id, account="default", now=utcnow())
    # Pending again: the old thread's outcome must not end the retried task ...
    assert not await _record(attempts, _succeeded(task_id, attempt=1))
    assert (await load_task(sessions, task_id)).status == "pending"
    # ... nor its next attempt, once released and running.
    async with sessions.begin() as session:
        await (
            open_outbox(settings=settings, engine=engine)
            .claim_in(session)
            .mark_queued(task_ids=[task_id], relay_id="r", now=utcnow() + timedelta(seconds=1))
        )
    assert await _start(attempts, sessions, task_id) == 2
    assert not await _record(attempts, _succeeded(task_id, attempt=1))
    assert (await load_task(sessions, task_id)).status == "running"

    assert await _record(attempts, _succeeded(task_id, attempt=2))
    assert (await load_task(sessions, task_id)).status == "succeeded"


async def test_a_claim_and_a_cancel_at_once_end_cancelled(
    settings: Settings, engine: AsyncEngine, sessions: SessionFactory
) -> None:
    async with sessions.begin() as session:
        submitted = await submit_task(
            session, name="greeting", account="default", payload={"name": "x"}, now=utcnow()
        )
    task_id = submitted.id
    outbox = open_outbox(settings=settings, engine=engine)
    cancels = CancelStore(engine)

    async with outbox.claiming() as claim:
        claims = await claim.select_claimable(limit=10, now=utcnow())
        assert [c.task_id for c in claims] == [task_id]
        # The cancel waits for the claim's locks (or SQLite's write lock) ...
        cancelling = asyncio.create_task(
            cancels.cancel(task_id=task_id, account="default", now=utcnow())
        )
        await claim.lease(claims=claims, queued_at=[utcnow()], relay_id="r", lease_s=5.0)
    # ... and then cancels the queued task; the relay's release deletes nothing more.
    answer = await cancelling
    async with outbox.claiming() as claim:
        await claim.release(relay_id="r", outbox_ids=[c.outbox_id for c in claims])
        # Nothing of the task is claimable again.
        assert await claim.select_claimable(limit=10, now=utcnow() + timedelta(hours=1)) == []

    assert answer.outcome is CancelOutcome.CANCELLED
    assert (await load_task(sessions, task_id)).status == "cancelled"
    async with sessions() as session:
        assert await event_history(session, task_id) == ["submitted", "queued", "cancelled"]


async def test_the_reconciler_leaves_cancelled_tasks_alone(
    settings: Settings, engine: AsyncEngine, sessions: SessionFactory, redis: Redis
) -> None:
    task_id = await queue_task(sessions, name="greeting", payload={"name": "x"})
    await CancelStore(engine).cancel(task_id=task_id, account="default", now=utcnow())

    # Long past every grace period, and no ARQ job anywhere.
    report = await reconcile_once(
        store=open_recovery(settings, engine),
        redis=redis,
        settings=settings,
        now=utcnow() + timedelta(hours=1),
    )

    assert report.examined == 0
    assert (await load_task(sessions, task_id)).status == "cancelled"
