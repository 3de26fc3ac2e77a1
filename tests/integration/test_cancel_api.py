"""POST /api/v1/tasks/{id}/cancel and POST /api/v1/tasks/cancel on SQLite and PostgreSQL.

A pending, queued or running task ends ``cancelled`` at once, in one transaction with
its outbox row gone and one ``cancelled`` event naming who asked; a running attempt's
job is asked to stop through ARQ's abort set; a terminal task is a 409 with its view;
a running side-effecting one a 409 unless forced; unknown and other accounts' tasks a
404; filters and ``?force`` strict; a call by filter cancels a bounded number of tasks.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.cancel_support import api_with_side_effecting
from tests.support import submit_task, wait_for
from throttler.aborts import ABORT_KEEP_S, ABORT_KEY
from throttler.constants import FINISHED_CHANNEL
from throttler.db import SessionFactory
from throttler.job_ids import Dispatch
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.cancels import CancelFilter, CancelStore

API = "/api/v1"
GREETING_SIDE_EFFECTING = frozenset({"greeting"})


async def _task(
    sessions: SessionFactory,
    status: TaskStatus,
    *,
    name: str = "greeting",
    account: str = "default",
    ago_s: float = 0.0,
) -> str:
    """A task left in ``status`` as the pipeline leaves it (queued/running: released)."""
    async with sessions.begin() as session:
        submitted = await submit_task(
            session,
            name=name,
            account=account,
            payload={"name": "x"} if name == "greeting" else {"duration": 0},
            now=utcnow() - timedelta(seconds=ago_s),
        )
        values: dict[str, Any] = {"status": status.value}
        if status != TaskStatus.PENDING:
            values["queued_at"] = utcnow()
            await session.execute(delete(OutboxEntry).where(OutboxEntry.task_id == submitted.id))
        if status in (TaskStatus.RUNNING, TaskStatus.SUCCEEDED, TaskStatus.FAILED):
            values |= {"attempts": 1, "started_at": utcnow()}
        if status.is_terminal:
            values["finished_at"] = utcnow()
        await session.execute(update(Task).where(Task.id == submitted.id).values(**values))
    return submitted.id


async def _load(sessions: SessionFactory, task_id: str) -> Task:
    async with sessions() as session:
        task = await session.get(Task, task_id)
    assert task is not None
    return task


async def _outbox_rows(sessions: SessionFactory, task_id: str) -> int:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxEntry).where(OutboxEntry.task_id == task_id)
        )
    return int(count or 0)


async def _cancelled_events(sessions: SessionFactory, task_id: str) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.scalars(
            select(TaskEvent.detail)
            .where(TaskEvent.task_id == task_id, TaskEvent.event == "cancelled")
            .order_by(TaskEvent.id)
        )
        return list(rows.all())


async def _job_id(sessions: SessionFactory, task_id: str) -> str:
    task = await _load(sessions, task_id)
    return Dispatch.of(task_id, queued_at=task.queued_at).job_id


@pytest.mark.parametrize("status", [TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING])
async def test_cancel_ends_a_pending_queued_or_running_task_at_once(
    api_client: httpx.AsyncClient, sessions: SessionFactory, redis: Redis, status: TaskStatus
) -> None:
    task_id = await _task(sessions, status)
    before = utcnow()

    response = await api_client.post(f"{API}/tasks/{task_id}/cancel")

    assert response.status_code == 200, response.text
    view = response.json()
    assert (view["task_id"], view["status"]) == (task_id, "cancelled")
    assert view["finished_at"] is not None
    task = await _load(sessions, task_id)
    assert task.status == "cancelled"
    assert task.finished_at is not None
    assert task.finished_at >= before - timedelta(seconds=1)
    assert await _outbox_rows(sessions, task_id) == 0
    assert await _cancelled_events(sessions, task_id) == [
        {"by": "default", "from": status.value, "force": False}
    ]
    aborts = [job.decode() for job in await redis.zrange(ABORT_KEY, 0, -1)]
    if status == TaskStatus.RUNNING:
        # The running attempt's ARQ job is asked to stop (throttler.aborts).
        assert response.headers["Cancel-Interrupt"] == "requested"
        assert aborts == [await _job_id(sessions, task_id)]
    else:
        # Nothing runs: a job picked up later finds the task final and starts nothing.
        assert "Cancel-Interrupt" not in response.headers
        assert aborts == []


async def test_cancel_announces_the_task_finished(
    api_client: httpx.AsyncClient, sessions: SessionFactory, redis: Redis
) -> None:
    task_id = await _task(sessions, TaskStatus.QUEUED)
    listener = redis.pubsub()
    await listener.subscribe(FINISHED_CHANNEL)

    async def announced() -> bool:
        message = await listener.get_message(ignore_subscribe_messages=True, timeout=0.1)
        return message is not None and message["data"] == task_id.encode()

    try:
        response = await api_client.post(f"{API}/tasks/{task_id}/cancel")
        assert response.status_code == 200, response.text
        await wait_for(announced, message="the finished announcement")
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]


async def test_cancel_prunes_aborts_nobody_took(
    api_client: httpx.AsyncClient, sessions: SessionFactory, redis: Redis
) -> None:
    # An abort whose job had ended before it came (ARQ never prunes those).
    stale_ms = int((utcnow().timestamp() - ABORT_KEEP_S - 5) * 1000)
    await redis.zadd(ABORT_KEY, {"gone@1": stale_ms})
    task_id = await _task(sessions, TaskStatus.RUNNING)

    response = await api_client.post(f"{API}/tasks/{task_id}/cancel")

    assert response.status_code == 200, response.text
    aborts = [job.decode() for job in await redis.zrange(ABORT_KEY, 0, -1)]
    assert aborts == [await _job_id(sessions, task_id)]


@pytest.mark.parametrize("status", [TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED])
async def test_cancel_of_a_finished_task_is_409_with_its_view(
    api_client: httpx.AsyncClient, sessions: SessionFactory, status: TaskStatus
) -> None:
    task_id = await _task(sessions, status)
    before = await _load(sessions, task_id)

    response = await api_client.post(f"{API}/tasks/{task_id}/cancel")

    assert response.status_code == 409, response.text
    body = response.json()
    assert (body["task_id"], body["status"]) == (task_id, status.value)
    assert body["detail"] == f"the task is already {status.value}"
    after = await _load(sessions, task_id)
    assert (after.status, after.finished_at) == (before.status, before.finished_at)
    assert await _cancelled_events(sessions, task_id) == []


@pytest.mark.parametrize("task_id", ["no-such-task", "x" * 300, "nul%01"])
async def test_cancel_of_an_unknown_task_is_404(
    api_client: httpx.AsyncClient, task_id: str
) -> None:
    response = await api_client.post(f"{API}/tasks/{task_id}/cancel")
    assert response.status_code == 404, response.text


async def test_cancel_of_another_accounts_task_is_404_and_changes_nothing(
    settings: Settings, sessions: SessionFactory
) -> None:
    settings = settings.model_copy(update={"api_keys": "k1:alice,k2:bob"})
    task_id = await _task(sessions, TaskStatus.PENDING, account="bob")
    async with api_with_side_effecting(settings, side_effecting=frozenset()) as client:
        as_alice = {"Authorization": "Bearer k1"}
        one = await client.post(f"{API}/tasks/{task_id}/cancel", headers=as_alice)
        many = await client.post(f"{API}/tasks/cancel", json={}, headers=as_alice)
        assert one.status_code == 404, one.text
        assert many.json() == {"count": 0, "remaining": 0, "skipped": 0}
        assert (await _load(sessions, task_id)).status == "pending"
        assert await _outbox_rows(sessions, task_id) == 1
        # Its own account cancels it, and the event names who asked.
        as_bob = {"Authorization": "Bearer k2"}
        response = await client.post(f"{API}/tasks/{task_id}/cancel", headers=as_bob)
        assert response.status_code == 200, response.text
    assert await _cancelled_events(sessions, task_id) == [
        {"by": "bob", "from": "pending", "force": False}
    ]


async def test_a_running_side_effecting_task_is_cancelled_only_when_forced(
    settings: Settings, sessions: SessionFactory, redis: Redis
) -> None:
    task_id = await _task(sessions, TaskStatus.RUNNING)
    async with api_with_side_effecting(settings, side_effecting=GREETING_SIDE_EFFECTING) as client:
        refused = await client.post(f"{API}/tasks/{task_id}/cancel")
        assert refused.status_code == 409, refused.text
        assert refused.json()["status"] == "running"
        assert "?force=true" in refused.json()["detail"]
        assert (await _load(sessions, task_id)).status == "running"
        assert await redis.zcard(ABORT_KEY) == 0

        forced = await client.post(f"{API}/tasks/{task_id}/cancel?force=true")
        assert forced.status_code == 200, forced.text
        assert forced.json()["status"] == "cancelled"
    assert await _cancelled_events(sessions, task_id) == [
        {"by": "default", "from": "running", "force": True}
    ]
    assert [job.decode() for job in await redis.zrange(ABORT_KEY, 0, -1)] == [
        await _job_id(sessions, task_id)
    ]


async def test_a_side_effecting_task_not_yet_running_is_cancelled_without_force(
    settings: Settings, sessions: SessionFactory
) -> None:
    task_id = await _task(sessions, TaskStatus.QUEUED)
    async with api_with_side_effecting(settings, side_effecting=GREETING_SIDE_EFFECTING) as client:
        response = await client.post(f"{API}/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text


async def test_concurrent_cancels_of_one_task_cancel_it_once(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    task_id = await _task(sessions, TaskStatus.QUEUED)

    responses = await asyncio.gather(
        *(api_client.post(f"{API}/tasks/{task_id}/cancel") for _ in range(4))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [200, 409, 409, 409], [r.text for r in responses]
    assert all(response.json()["status"] == "cancelled" for response in responses)
    assert await _cancelled_events(sessions, task_id) == [
        {"by": "default", "from": "queued", "force": False}
    ]


async def test_concurrent_cancels_and_retries_keep_one_consistent_history(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    task_id = await _task(sessions, TaskStatus.PENDING)

    calls = [
        api_client.post(f"{API}/tasks/{task_id}/{'cancel' if i % 2 == 0 else 'retry'}")
        for i in range(8)
    ]
    responses = await asyncio.gather(*calls)

    assert all(r.status_code in (200, 409) for r in responses), [r.text for r in responses]
    async with sessions() as session:
        history = list(
            (
                await session.scalars(
                    select(TaskEvent.event)
                    .where(TaskEvent.task_id == task_id, TaskEvent.event != "submitted")
                    .order_by(TaskEvent.id)
                )
            ).all()
        )
    # Each 200 is one transition, and they alternate: cancelled, retried, cancelled, ...
    assert len(history) == sum(r.status_code == 200 for r in responses)
    assert history == ["cancelled", "retried"] * (len(history) // 2) + (
        ["cancelled"] if len(history) % 2 else []
    )
    task = await _load(sessions, task_id)
    assert task.status == ("cancelled" if len(history) % 2 else "pending")
    assert await _outbox_rows(sessions, task_id) == (0 if len(history) % 2 else 1)


async def test_cancel_by_filter_takes_the_callers_matching_tasks(
    api_client: httpx.AsyncClient, sessions: SessionFactory, redis: Redis
) -> None:
    old_pending = await _task(sessions, TaskStatus.PENDING, ago_s=3600)
    pending = await _task(sessions, TaskStatus.PENDING)
    queued = await _task(sessions, TaskStatus.QUEUED)
    running = await _task(sessions, TaskStatus.RUNNING)
    other_name = await _task(sessions, TaskStatus.PENDING, name="non_blocking_long_running_task")
    succeeded = await _task(sessions, TaskStatus.SUCCEEDED)
    foreign = await _task(sessions, TaskStatus.PENDING, account="someone-else")

    cutoff = (utcnow() - timedelta(seconds=1800)).isoformat()
    answer = await api_client.post(f"{API}/tasks/cancel", json={"created_before": cutoff})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"count": 1, "remaining": 0, "skipped": 0}
    assert (await _load(sessions, old_pending)).status == "cancelled"

    answer = await api_client.post(
        f"{API}/tasks/cancel", json={"status": "pending", "name": "greeting"}
    )
    assert answer.json() == {"count": 1, "remaining": 0, "skipped": 0}
    assert (await _load(sessions, pending)).status == "cancelled"
    assert (await _load(sessions, queued)).status == "queued"
    assert "Cancel-Interrupt" not in answer.headers

    answer = await api_client.post(f"{API}/tasks/cancel", json={})
    assert answer.json() == {"count": 3, "remaining": 0, "skipped": 0}
    assert answer.headers["Cancel-Interrupt"] == "requested"
    for task_id, was in ((queued, "queued"), (running, "running"), (other_name, "pending")):
        assert (await _load(sessions, task_id)).status == "cancelled"
        assert await _outbox_rows(sessions, task_id) == 0
        assert await _cancelled_events(sessions, task_id) == [
            {"by": "default", "from": was, "force": False}
        ]
    assert [job.decode() for job in await redis.zrange(ABORT_KEY, 0, -1)] == [
        await _job_id(sessions, running)
    ]
    assert (await _load(sessions, succeeded)).status == "succeeded"
    assert (await _load(sessions, foreign)).status == "pending"

    answer = await api_client.post(f"{API}/tasks/cancel", json={})
    assert answer.json() == {"count": 0, "remaining": 0, "skipped": 0}


async def test_cancel_by_filter_skips_running_side_effecting_tasks_unless_forced(
    settings: Settings, sessions: SessionFactory
) -> None:
    running = await _task(sessions, TaskStatus.RUNNING)
    queued = await _task(sessions, TaskStatus.QUEUED)
    other = await _task(sessions, TaskStatus.RUNNING, name="non_blocking_long_running_task")
    async with api_with_side_effecting(settings, side_effecting=GREETING_SIDE_EFFECTING) as client:
        answer = await client.post(f"{API}/tasks/cancel", json={})
        # Skipped, and not in remaining: a client calling until remaining is 0 stops.
        assert answer.json() == {"count": 2, "remaining": 0, "skipped": 1}
        assert (await _load(sessions, running)).status == "running"
        assert (await _load(sessions, queued)).status == "cancelled"
        assert (await _load(sessions, other)).status == "cancelled"

        answer = await client.post(f"{API}/tasks/cancel", json={"status": "pending"})
        assert answer.json() == {"count": 0, "remaining": 0, "skipped": 0}

        forced = await client.post(f"{API}/tasks/cancel?force=true", json={})
        assert forced.json() == {"count": 1, "remaining": 0, "skipped": 0}
    assert await _cancelled_events(sessions, running) == [
        {"by": "default", "from": "running", "force": True}
    ]


async def test_cancel_by_filter_is_bounded_per_call_and_counts_the_rest(
    engine: AsyncEngine, sessions: SessionFactory
) -> None:
    ids = [await _task(sessions, TaskStatus.PENDING, ago_s=100 - i) for i in range(5)]
    cancels = CancelStore(engine)
    selection = CancelFilter(account="default")

    first = await cancels.cancel_matching(selection, now=utcnow(), limit=2)
    assert (first.count, first.remaining) == (2, 3)
    # Oldest first.
    assert [(await _load(sessions, task_id)).status for task_id in ids] == [
        "cancelled",
        "cancelled",
        "pending",
        "pending",
        "pending",
    ]
    second = await cancels.cancel_matching(selection, now=utcnow(), limit=2)
    third = await cancels.cancel_matching(selection, now=utcnow(), limit=2)
    assert [(second.count, second.remaining), (third.count, third.remaining)] == [
        (2, 1),
        (1, 0),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"state": "pending"}, "state"),
        ({"status": "failed"}, "status"),
        ({"status": "cancelled"}, "status"),
        ({"status": ["pending"]}, "status"),
        ({"name": 5}, "name"),
        ({"name": ""}, "name"),
        ({"key": "Connector:salesforce"}, "key"),
        ({"key": "connector"}, "key"),
        ({"created_before": "2026-01-01T00:00:00"}, "created_before"),
        ({"created_before": 1700000000}, "created_before"),
    ],
)
async def test_cancel_filter_is_validated_strictly(
    api_client: httpx.AsyncClient, sessions: SessionFactory, body: dict[str, Any], field: str
) -> None:
    task_id = await _task(sessions, TaskStatus.PENDING)

    response = await api_client.post(f"{API}/tasks/cancel", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:2] == ["body", field]
    assert (await _load(sessions, task_id)).status == "pending"


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("force=yes", "force"),
        ("force=1", "force"),
        ("force=True", "force"),
        ("force=", "force"),
        ("force=true&force=false", "force"),
        ("forse=true", "forse"),
    ],
)
@pytest.mark.parametrize("path", ["/tasks/{task_id}/cancel", "/tasks/cancel"])
async def test_force_is_parsed_strictly(
    api_client: httpx.AsyncClient, sessions: SessionFactory, query: str, name: str, path: str
) -> None:
    task_id = await _task(sessions, TaskStatus.PENDING)

    response = await api_client.post(f"{API}{path.format(task_id=task_id)}?{query}", json={})

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["query", name]
    assert (await _load(sessions, task_id)).status == "pending"


async def test_cancel_answers_200_when_redis_cannot_be_told(
    settings: Settings, sessions: SessionFactory, closed_port: int
) -> None:
    # The database is the truth: the cancel stands; the attempt's outcome will be discarded.
    settings = settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{closed_port}/0"})
    task_id = await _task(sessions, TaskStatus.RUNNING)
    async with api_with_side_effecting(settings, side_effecting=frozenset()) as client:
        response = await client.post(f"{API}/tasks/{task_id}/cancel")
    assert response.status_code == 200, response.text
    assert response.headers["Cancel-Interrupt"] == "not-sent"
    assert (await _load(sessions, task_id)).status == "cancelled"
