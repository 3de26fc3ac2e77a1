"""Every attempt goes back through the outbox and is released by the relay under the limits.

A real relay (with the Redis limiter and the in-flight caps), a real worker, Redis and the
database, in process. The release moments are read from the audit trail (the ``queued``
events: what the limiter granted), not from wall clocks.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import pytest
from arq.connections import ArqRedis
from arq.constants import result_key_prefix
from sqlalchemy import insert, select, update

from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    enqueue,
    fast_retries,
    job_id_of,
    load_task,
    queue_task,
    running_relay,
    running_worker,
    wait_final,
    wait_status,
)
from tests.support import event_history, submit_task, wait_for
from throttler.catalog import GREETING, GreetingInput
from throttler.db import SessionFactory
from throttler.limits import RuleSet
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.throttle import build_limiter
from worker.taskkit import Resources, RetriableTask
from worker.tasks.greeting import GreetingOutput

MAX_TRIES = 3


class _Failing(BaseHTTPRequestHandler):
    """Answers 500 to everything, and notes when each request arrived."""

    arrivals: ClassVar[list[float]]

    def do_GET(self) -> None:
        self.arrivals.append(utcnow().timestamp())
        body = b"down"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def failing_server() -> Iterator[tuple[str, list[float]]]:
    arrivals: list[float] = []
    handler = type("Handler", (_Failing,), {"arrivals": arrivals})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/broken", arrivals
    server.shutdown()
    server.server_close()
    thread.join()


async def _events(sessions: SessionFactory, task_id: str) -> list[TaskEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        )
        return list(rows.all())


async def _submit(
    sessions: SessionFactory, *, name: str, payload: dict[str, Any], **kw: Any
) -> str:
    async with sessions.begin() as session:
        submitted = await submit_task(
            session, name=name, account="default", payload=payload, now=utcnow(), **kw
        )
    return submitted.id


async def test_retries_of_a_failing_download_are_released_by_the_host_rate_limit(
    settings: Settings, sessions: SessionFactory, failing_server: tuple[str, list[float]]
) -> None:
    url, arrivals = failing_server
    rules = "host:* rate=1/s"
    # Backoff far below the limit's interval: only the limiter can space the attempts.
    settings = fast_retries(
        settings,
        relay_limits=rules,
        worker_max_tries=MAX_TRIES,
        download_allow_private=True,
    )
    async with arq_pool(settings) as pool:
        limiter = build_limiter(redis=pool, rules=RuleSet.parse(rules))
        async with (
            running_relay(settings, sessions, pool, limiter=limiter),
            running_worker(settings),
        ):
            task_id = await _submit(
                sessions, name="download", payload={"url": url}, host="127.0.0.1"
            )
            task = await wait_final(sessions, task_id, timeout_s=30)

    assert task.status == TaskStatus.FAILED
    assert task.attempts == MAX_TRIES
    assert task.error is not None
    assert f"gave up after {MAX_TRIES} attempts" in task.error
    events = await _events(sessions, task_id)
    # Every attempt is in the audit trail, each released by the relay.
    assert [event.event for event in events] == [
        "submitted",
        *["queued", "started", "retrying"] * (MAX_TRIES - 1),
        "queued",
        "started",
        "failed",
    ]
    released = [event.at.timestamp() for event in events if event.event == EventKind.QUEUED]
    # The limiter's grants for one host: at least its interval apart.
    assert min(b - a for a, b in itertools.pairwise(released)) >= 1.0 - 1e-6
    # No attempt ran before its release.
    started = [event.at for event in events if event.event == EventKind.STARTED]
    for release, start in zip(released, started, strict=True):
        assert start.timestamp() >= release - 0.002  # ARQ scores are whole milliseconds
    retrying = [event for event in events if event.event == EventKind.RETRYING]
    assert [event.detail["attempt"] for event in retrying] == list(range(1, MAX_TRIES))
    assert all("HTTP 500" in event.detail["error"] for event in retrying)
    assert all(0 < event.detail["defer_s"] <= 0.05 for event in retrying)
    assert len(arrivals) == MAX_TRIES


class FailsFirst(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    """Fails the first attempt of a name starting with ``flaky``; greets otherwise."""

    output_model = GreetingOutput
    calls: ClassVar[dict[str, int]] = {}

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        self.calls[params.name] = self.calls.get(params.name, 0) + 1
        if params.name.startswith("flaky") and self.calls[params.name] == 1:
            raise ConnectionError("flaky once")
        return GreetingOutput(message=f"Hello, {params.name}!")


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    level = peak = 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    return peak


async def test_an_inflight_cap_counts_a_retry_like_a_first_attempt(
    settings: Settings, sessions: SessionFactory
) -> None:
    rules = "task:greeting inflight=1"
    # A backoff long enough that the other task is released during it, also on a loaded
    # machine: the backoff runs from the failure, not from its commit, and a commit that
    # took longer than the backoff would find both tasks due at once.
    settings = settings.model_copy(
        update={
            "relay_limits": rules,
            "worker_retry_backoff_s": 4.0,
            "worker_retry_backoff_max_s": 4.0,
        }
    )
    FailsFirst.calls.clear()
    async with arq_pool(settings) as pool:
        # The flaky task goes first whatever else the claim weighs: a higher priority.
        flaky = await _submit(sessions, name="greeting", payload={"name": "flaky"}, priority=9)
        other = await _submit(sessions, name="greeting", payload={"name": "other"})
        async with (
            running_relay(settings, sessions, pool),
            running_worker(settings, tasks=[FailsFirst]),
        ):
            for task_id in (flaky, other):
                assert (await wait_final(sessions, task_id)).status == TaskStatus.SUCCEEDED

    intervals: list[tuple[datetime, datetime]] = []
    moments: dict[str, list[tuple[str, datetime]]] = {}
    for task_id in (flaky, other):
        events = await _events(sessions, task_id)
        moments[task_id] = [(event.event, event.at) for event in events]
        released = [event.at for event in events if event.event == EventKind.QUEUED]
        ended = [
            event.at
            for event in events
            if event.event in (EventKind.RETRYING, EventKind.SUCCEEDED, EventKind.FAILED)
        ]
        intervals += list(zip(released, ended, strict=True))
    # Each attempt held the task's one slot from its release to its outcome, never two.
    assert _max_overlap(intervals) == 1
    flaky_events = [kind for kind, _ in moments[flaky]]
    assert flaky_events == [
        "submitted",
        "queued",
        "started",
        "retrying",
        "queued",
        "started",
        "succeeded",
    ]
    # The retry gave its slot back during its backoff: the other task went then, and the
    # retry's release waited for the other task's slot like a first attempt.
    retrying_at = next(at for kind, at in moments[flaky] if kind == "retrying")
    second_release = [at for kind, at in moments[flaky] if kind == "queued"][1]
    other_released = next(at for kind, at in moments[other] if kind == "queued")
    other_done = next(at for kind, at in moments[other] if kind == "succeeded")
    assert retrying_at <= other_released <= other_done <= second_release


async def _requeue_behind_arqs_back(sessions: SessionFactory, task_id: str) -> None:
    """What recovery does: the task back to pending with a new outbox row, ``requeued``."""
    now = utcnow()
    async with sessions.begin() as session:
        await session.execute(
            update(Task).where(Task.id == task_id).values(status=TaskStatus.PENDING, queued_at=None)
        )
        await session.execute(insert(OutboxEntry).values(task_id=task_id, created_at=now))
        await session.execute(
            insert(TaskEvent).values(
                task_id=task_id,
                at=now,
                event=EventKind.REQUEUED,
                detail={"reason": "job_missing", "previous_status": "queued", "attempt": 0},
            )
        )


async def _job_ended(pool: ArqRedis, job_id: str) -> bool:
    return bool(await pool.exists(result_key_prefix + job_id))


async def test_a_stale_job_starts_nothing_and_the_new_dispatch_runs_once(
    settings: Settings, sessions: SessionFactory
) -> None:
    FailsFirst.calls.clear()
    async with arq_pool(settings) as pool:
        task_id = await queue_task(sessions, name="greeting", payload={"name": "stale"})
        stale = await job_id_of(sessions, task_id)
        await enqueue(pool, settings, name="greeting", job_id=stale)
        # Recovery requeued the task while its first job was still in ARQ.
        await _requeue_behind_arqs_back(sessions, task_id)
        async with running_worker(settings, tasks=[FailsFirst]):
            # The stale job runs first, alone: the task is pending, so it starts nothing.
            await wait_for(lambda: _job_ended(pool, stale), message="the stale job to end")
            async with sessions() as session:
                assert await event_history(session, task_id) == [
                    "submitted",
                    "queued",
                    "requeued",
                ]
            async with running_relay(settings, sessions, pool):
                task = await wait_final(sessions, task_id)
            fresh = await job_id_of(sessions, task_id)

    assert fresh != stale
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert FailsFirst.calls == {"stale": 1}
    async with sessions() as session:
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "requeued",
            "queued",
            "started",
            "succeeded",
        ]


async def test_a_stale_job_does_not_start_a_later_dispatch(
    settings: Settings, sessions: SessionFactory
) -> None:
    FailsFirst.calls.clear()
    async with arq_pool(settings) as pool:
        task_id = await queue_task(sessions, name="greeting", payload={"name": "later"})
        stale = await job_id_of(sessions, task_id)
        await _requeue_behind_arqs_back(sessions, task_id)
        # The relay releases the next dispatch before the stale job is ever picked up.
        async with running_relay(settings, sessions, pool):

            async def released_again() -> bool:
                async with sessions() as session:
                    return (await event_history(session, task_id)).count("queued") == 2

            await wait_for(released_again, message="the next dispatch")
        fresh = await job_id_of(sessions, task_id)
        # The stale job sits in ARQ ahead of the new one.
        await enqueue(pool, settings, name="greeting", job_id=stale)
        await pool.zadd(settings.arq_queue_name, {stale: 0})
        async with running_worker(settings, tasks=[FailsFirst]):
            task = await wait_final(sessions, task_id)
            await wait_for(lambda: _job_ended(pool, stale), message="the stale job to end")

    assert fresh != stale
    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert FailsFirst.calls == {"later": 1}


async def test_a_job_under_the_bare_task_id_starts_nothing(
    settings: Settings, sessions: SessionFactory
) -> None:
    # Enqueued by hand, or by a relay from before dispatch ids (an upgrade): it names no
    # attempt the limits released. The task stays queued for its own job (or recovery).
    FailsFirst.calls.clear()
    async with arq_pool(settings) as pool:
        task_id = await queue_task(sessions, name="greeting", payload={"name": "bare"})
        await enqueue(pool, settings, name="greeting", job_id=task_id)
        async with running_worker(settings, tasks=[FailsFirst]):
            await wait_for(lambda: _job_ended(pool, task_id), message="the bare job to end")
        async with sessions() as session:
            assert await event_history(session, task_id) == ["submitted", "queued"]
        await enqueue(pool, settings, name="greeting", job_id=await job_id_of(sessions, task_id))
        async with running_worker(settings, tasks=[FailsFirst]):
            task = await wait_final(sessions, task_id)

    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 1)
    assert FailsFirst.calls == {"bare": 1}


class HangsFirst(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    """Hangs on its first attempt (until the worker stops), greets on the next."""

    output_model = GreetingOutput
    calls: ClassVar[int] = 0

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        type(self).calls += 1
        if type(self).calls == 1:
            await asyncio.sleep(3600)
        return GreetingOutput(message=f"Hello, {params.name}!")


async def test_an_attempt_cut_short_by_a_stopping_worker_goes_back_through_the_outbox(
    settings: Settings, sessions: SessionFactory
) -> None:
    HangsFirst.calls = 0
    async with arq_pool(settings) as pool:
        async with running_worker(settings, tasks=[HangsFirst]):
            task_id = await dispatch(
                sessions, pool, settings, name="greeting", payload={"name": "cut"}
            )
            await wait_status(sessions, task_id, "running")
        # The worker stopped and cancelled the job: the task is back in the outbox, and
        # ARQ's re-queued job starts nothing.
        task = await load_task(sessions, task_id)
        assert (task.status, task.attempts) == (TaskStatus.PENDING, 1)
        requeued = (await _events(sessions, task_id))[-1]
        assert (requeued.event, requeued.detail["reason"]) == ("requeued", "worker_stopping")
        assert requeued.detail["attempt"] == 1
        async with running_worker(settings, tasks=[HangsFirst]):
            async with sessions() as session:
                assert await event_history(session, task_id) == [
                    "submitted",
                    "queued",
                    "started",
                    "requeued",
                ]
            async with running_relay(settings, sessions, pool):
                task = await wait_final(sessions, task_id)

    assert (task.status, task.attempts) == (TaskStatus.SUCCEEDED, 2)
    assert HangsFirst.calls == 2
    async with sessions() as session:
        assert await event_history(session, task_id) == [
            "submitted",
            "queued",
            "started",
            "requeued",
            "queued",
            "started",
            "succeeded",
        ]
