"""Fencing: a relay or worker whose lease was taken over writes nothing over the new owner.

The partition test (tests/acceptance/test_partition.py) shows it end to end; here each
fence on its own, on both databases through the store each dialect uses:

* a relay's outbox lease lapsed and another relay took the row: the first relay's
  retime, release and mark_queued change nothing;
* a worker's attempt was taken over (its in-progress lease lapsed, another worker put the
  task back, and it runs again on a later dispatch): the first worker's start of its old
  job and its late outcomes change nothing;
* (PostgreSQL) a claim, an attempt batch or a recovery whose client went silent
  mid-transaction is ended by the server after the idle limit, and its locks go with it
  (throttler.store.fencing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Executable, delete, event, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.conftest import _truncate_all
from tests.support import submit_task
from throttler.constants import CLAIM_LOCK_KEY
from throttler.db import create_engine, create_session_factory
from throttler.errors import is_transient_db_error
from throttler.job_ids import Dispatch
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import Outcome, open_attempts
from throttler.store.outbox import ClaimedTask, CoreOutbox, open_outbox
from throttler.store.postgres_outbox import PostgresOutbox
from throttler.store.recovery import SqlRecoveryStore

RELAY_B, RELAY_A = "relay-b", "relay-a"
WORKER_B, WORKER_A = "worker-b", "worker-a"
LEASE_S = 2.0
# Short, so that the tests of the idle limit wait little.
IDLE_S = 0.5


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=database_url))
    yield engine
    await engine.dispose()


@pytest.fixture
def postgres_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("postgres_database")
    asyncio.run(_truncate_all(url))
    return url


@pytest.fixture
async def postgres(postgres_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Settings(database_url=postgres_url))
    yield engine
    await engine.dispose()


async def _submit(engine: AsyncEngine, now: datetime) -> str:
    async with create_session_factory(engine).begin() as session:
        task = await submit_task(
            session, name="greeting", account="default", payload={"name": "x"}, now=now
        )
    return task.id


async def _claim(
    outbox: CoreOutbox, *, relay_id: str, now: datetime
) -> tuple[list[ClaimedTask], datetime]:
    """One claim of everything claimable at ``now``, each row queued at ``now``."""
    async with outbox.claiming() as claim:
        claims = await claim.select_claimable(limit=10, now=now)
        await claim.lease(
            claims=claims, queued_at=[now] * len(claims), relay_id=relay_id, lease_s=LEASE_S
        )
    return claims, now


async def _state(engine: AsyncEngine, task_id: str) -> dict[str, Any]:
    async with engine.connect() as connection:
        task = (
            await connection.execute(
                select(Task.status, Task.queued_at, Task.attempts).where(Task.id == task_id)
            )
        ).one()
        outbox = (
            await connection.execute(
                select(OutboxEntry.id, OutboxEntry.claimed_by, OutboxEntry.claimed_until).where(
                    OutboxEntry.task_id == task_id
                )
            )
        ).all()
        events = (
            await connection.execute(
                select(TaskEvent.event, TaskEvent.detail)
                .where(TaskEvent.task_id == task_id)
                .order_by(TaskEvent.id)
            )
        ).all()
    return {
        "task": tuple(task),
        "outbox": [tuple(row) for row in outbox],
        "events": [(name, detail) for name, detail in events],
    }


async def test_a_stale_relay_changes_nothing_once_its_lease_is_taken_over(
    database_url: str, engine: AsyncEngine
) -> None:
    settings = Settings(database_url=database_url)
    outbox = open_outbox(settings=settings, engine=engine)
    start = utcnow()
    task_id = await _submit(engine, start)
    # B leases the row and marks the task queued, then goes silent past its lease.
    (b_claim,), _ = await _claim(outbox, relay_id=RELAY_B, now=start)
    assert b_claim.task_id == task_id
    # A takes the lapsed lease over (the task is queued already: it keeps its moment).
    later = start + timedelta(seconds=LEASE_S + 1)
    (a_claim,), _ = await _claim(outbox, relay_id=RELAY_A, now=later)
    assert a_claim.outbox_id == b_claim.outbox_id
    assert a_claim.status is TaskStatus.QUEUED
    taken_over = await _state(engine, task_id)
    assert taken_over["outbox"][0][1] == RELAY_A

    # B comes back with its batch in hand: new moments, the release, a mark_queued.
    async with outbox.claiming() as claim:
        moved = await claim.retime(
            claims=[b_claim],
            queued_at=[later + timedelta(seconds=1)],
            relay_id=RELAY_B,
            lease_s=LEASE_S,
        )
        await claim.release(relay_id=RELAY_B, outbox_ids=[b_claim.outbox_id])
        await claim.mark_queued(
            task_ids=[task_id], relay_id=RELAY_B, now=later + timedelta(seconds=2)
        )
    assert moved == set()
    # Nothing changed: A's lease, the task's dispatch moment, one queued event (B's first).
    assert await _state(engine, task_id) == taken_over
    assert [name for name, _ in taken_over["events"]] == [EventKind.SUBMITTED, EventKind.QUEUED]
    assert taken_over["task"][1] == start

    # A's own release still goes through.
    async with outbox.claiming() as claim:
        await claim.release(relay_id=RELAY_A, outbox_ids=[a_claim.outbox_id])
    assert (await _state(engine, task_id))["outbox"] == []


async def test_a_stale_worker_changes_nothing_once_its_attempt_is_taken_over(
    database_url: str, engine: AsyncEngine
) -> None:
    settings = Settings(database_url=database_url)
    outbox = open_outbox(settings=settings, engine=engine)
    attempts = open_attempts(settings, engine)
    try:
        start = utcnow()
        task_id = await _submit(engine, start)
        (first,), _ = await _claim(outbox, relay_id=RELAY_A, now=start)
        old_job = Dispatch.of(task_id, queued_at=start)
        # B starts attempt 1, then loses Redis: its in-progress lease lapses.
        b_start = await attempts.write(starts=[old_job], outcomes=[], worker_id=WORKER_B, now=start)
        assert b_start.started[task_id].attempt == 1
        # A gets the same job: the task runs on it already, so A puts it back.
        now = start + timedelta(seconds=5)
        a_start = await attempts.write(starts=[old_job], outcomes=[], worker_id=WORKER_A, now=now)
        orphan = a_start.started[task_id]
        assert orphan.orphaned
        requeued = Outcome(
            task_id=task_id,
            event=EventKind.REQUEUED,
            attempt=orphan.attempt,
            worker_id=WORKER_A,
            now=now,
            error="worker lost",
            reason="worker_lost",
            defer_s=0.0,
        )
        written = await attempts.write(starts=[], outcomes=[requeued], worker_id=WORKER_A, now=now)
        assert written.recorded == {task_id}
        async with outbox.claiming() as claim:
            await claim.release(relay_id=RELAY_A, outbox_ids=[first.outbox_id])
        # The relay releases the next dispatch; A runs attempt 2 on it.
        again = now + timedelta(seconds=1)
        await _claim(outbox, relay_id=RELAY_A, now=again)
        new_job = Dispatch.of(task_id, queued_at=again)
        a_second = await attempts.write(
            starts=[new_job], outcomes=[], worker_id=WORKER_A, now=again
        )
        assert a_second.started[task_id].attempt == 2
        before = await _state(engine, task_id)
        assert before["task"][0] == TaskStatus.RUNNING

        # B comes back: its attempt's outcomes and another delivery of its old job.
        late = again + timedelta(seconds=1)
        stale = [
            Outcome(
                task_id=task_id,
                event=event,
                attempt=1,
                worker_id=WORKER_B,
                now=late,
                result={"greeting": "stale"} if event is EventKind.SUCCEEDED else None,
                error=None if event is EventKind.SUCCEEDED else "stale",
                defer_s=None if event is EventKind.SUCCEEDED else 0.0,
            )
            for event in (EventKind.SUCCEEDED, EventKind.REQUEUED)
        ]
        for outcome in stale:
            written = await attempts.write(
                starts=[], outcomes=[outcome], worker_id=WORKER_B, now=late
            )
            assert written.recorded == set()
        restarted = await attempts.write(
            starts=[old_job], outcomes=[], worker_id=WORKER_B, now=late
        )
        assert restarted.started == {}
        # A's attempt 2 runs on, untouched; its own outcome is what ends the task.
        assert await _state(engine, task_id) == before
        done = Outcome(
            task_id=task_id,
            event=EventKind.SUCCEEDED,
            attempt=2,
            worker_id=WORKER_A,
            now=late,
            result={"greeting": "hi"},
        )
        written = await attempts.write(starts=[], outcomes=[done], worker_id=WORKER_A, now=late)
        assert written.recorded == {task_id}
    finally:
        await attempts.close()


async def _waits_for_lock(engine: AsyncEngine, statement: Executable) -> float:
    """Run ``statement`` (which waits for a lock) in a transaction of its own; how long
    it waited."""
    started = time.monotonic()
    async with engine.begin() as connection:
        await connection.execute(statement)
    return time.monotonic() - started


@pytest.mark.postgres
async def test_a_silent_claim_lets_go_of_the_claims_lock(postgres: AsyncEngine) -> None:
    outbox = PostgresOutbox(
        sessions=create_session_factory(postgres),
        read_sessions=create_session_factory(postgres),
        idle_timeout_s=IDLE_S,
    )
    waited: list[float] = []

    async def silent_claim() -> None:
        async with outbox.claiming() as claim:
            await claim.serialize()
            # The relay goes silent holding the lock (cut off, or stuck on Redis), while
            # another relay's claim waits for the lock.
            lock = select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY))
            waited.append(await _waits_for_lock(postgres, lock))

    # Nothing of the silent claim commits: its session is gone when it comes back.
    with pytest.raises(DBAPIError):
        await silent_claim()
    assert IDLE_S * 0.8 <= waited[0] < IDLE_S + 3


@pytest.mark.postgres
async def test_a_silent_recovery_lets_go_of_its_rows(postgres: AsyncEngine) -> None:
    now = utcnow()
    task_id = await _submit(postgres, now)
    queued_at = now - timedelta(hours=1)
    async with postgres.begin() as connection:
        # Queued long ago, its outbox row released: a recovery candidate.
        await connection.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(status=TaskStatus.QUEUED, queued_at=queued_at)
        )
        await connection.execute(delete(OutboxEntry).where(OutboxEntry.task_id == task_id))
    store = SqlRecoveryStore(
        sessions=create_session_factory(postgres),
        read_sessions=create_session_factory(postgres),
        idle_timeout_s=IDLE_S,
    )
    (candidate,) = await store.candidates(grace_cutoff=now, after_task_id="", limit=10)
    waited: list[float] = []

    async def silent_recovery() -> None:
        async with store.recovering(grace_cutoff=now, now=now) as unit:
            assert await unit.lock([candidate]) == [candidate]
            # The reconciler goes silent holding the row (its Redis re-check hangs).
            row = select(Task.id).where(Task.id == task_id).with_for_update()
            waited.append(await _waits_for_lock(postgres, row))

    with pytest.raises(DBAPIError):
        await silent_recovery()
    assert IDLE_S * 0.8 <= waited[0] < IDLE_S + 3
    async with postgres.connect() as connection:
        status = await connection.scalar(select(Task.status).where(Task.id == task_id))
    assert status == TaskStatus.QUEUED


def _driver_queries(engine: AsyncEngine, seen: list[str]) -> Any:
    """Log every query the driver of a connection checked out of ``engine`` runs."""

    def capture(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(lambda query: seen.append(query.query))

    event.listen(engine.sync_engine.pool, "checkout", capture)
    return capture


@pytest.mark.postgres
async def test_an_attempt_batch_limits_its_idle_time(postgres: AsyncEngine) -> None:
    """Each batch sets the limit before its first lock (a batch cannot be paused here)."""
    statements: list[str] = []
    attempts = open_attempts(
        Settings(database_url=postgres.url.render_as_string(False), database_timeout_s=IDLE_S),
        postgres,
    )
    task_id = await _submit(postgres, utcnow())
    capture = _driver_queries(postgres, statements)
    try:
        await attempts.write(
            starts=[Dispatch(task_id=task_id)], outcomes=[], worker_id=WORKER_A, now=utcnow()
        )
    finally:
        event.remove(postgres.sync_engine.pool, "checkout", capture)
        await attempts.close()
    ours = [statement for statement in statements if "tasks" in statement or "BEGIN" in statement]
    assert ours[0].startswith("BEGIN; SELECT set_config('idle_in_transaction_session_timeout'")
    assert "'500ms'" in ours[0]
    assert any("FOR UPDATE" in statement for statement in ours[1:])


@pytest.mark.postgres
async def test_an_attempt_batch_after_its_connection_died_fails_once_then_reconnects(
    postgres: AsyncEngine,
) -> None:
    """The store keeps one connection between batches: when the server ends it (a restart,
    an administrator, a network cut), the next batch fails as a transient database error,
    writes nothing, and the one after runs on a fresh connection."""
    settings = Settings(database_url=postgres.url.render_as_string(False))
    attempts = open_attempts(settings, postgres)
    first, second = await _submit(postgres, utcnow()), await _submit(postgres, utcnow())
    async with postgres.begin() as connection:
        await connection.execute(
            update(Task).values(status=TaskStatus.QUEUED.value, queued_at=utcnow())
        )
    try:
        await attempts.write(
            starts=[Dispatch(task_id=first)], outcomes=[], worker_id=WORKER_A, now=utcnow()
        )
        async with postgres.connect() as connection:
            # Every other session on this test's own database: the store's held one.
            ended = await connection.scalar(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND datname = current_database()"
                )
            )
        assert ended
        with pytest.raises(DBAPIError) as failed:
            await attempts.write(
                starts=[Dispatch(task_id=second)], outcomes=[], worker_id=WORKER_A, now=utcnow()
            )
        assert is_transient_db_error(failed.value)
        assert (await _state(postgres, second))["task"][0] == TaskStatus.QUEUED
        writes = await attempts.write(
            starts=[Dispatch(task_id=second)], outcomes=[], worker_id=WORKER_A, now=utcnow()
        )
    finally:
        await attempts.close()
    assert list(writes.started) == [second]
    assert (await _state(postgres, second))["task"][0] == TaskStatus.RUNNING
