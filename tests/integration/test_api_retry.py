"""POST /api/v1/tasks/{id}/retry and POST /api/v1/tasks/retry on SQLite and PostgreSQL.

A failed or cancelled task goes back to ``pending`` with one outbox row and one
``retried`` event naming who asked; any other status is a 409 with the task as it is;
an unknown or another account's task a 404; the filter is validated strictly and a call
retries a bounded number of tasks, saying how many still match.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.support import submit_task, wait_for
from throttler.constants import SUBMITTED_CHANNEL
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.statuses import TaskStatus
from throttler.store.retries import RetryFilter, RetryStore

API = "/api/v1"


async def _task(
    sessions: SessionFactory,
    status: TaskStatus,
    *,
    name: str = "greeting",
    account: str = "default",
    attempts: int = 1,
    ago_s: float = 0.0,
) -> str:
    """A task left in ``status`` after ``attempts`` attempts, as the pipeline leaves it."""
    async with sessions.begin() as session:
        submitted = await submit_task(
            session,
            name=name,
            account=account,
            payload={"name": "x"} if name == "greeting" else {"duration": 0},
            now=utcnow() - timedelta(seconds=ago_s),
        )
        values: dict[str, Any] = {"status": status.value, "attempts": attempts}
        if status.is_terminal:
            values |= {"finished_at": utcnow(), "error": "boom" if status != "succeeded" else None}
            if status == TaskStatus.SUCCEEDED:
                values["result"] = {"message": "Hello, x!"}
        await session.execute(update(Task).where(Task.id == submitted.id).values(**values))
        if status != TaskStatus.PENDING:
            await session.execute(delete(OutboxEntry).where(OutboxEntry.task_id == submitted.id))
    return submitted.id


async def _outbox_rows(sessions: SessionFactory, task_id: str) -> int:
    async with sessions() as session:
        count = await session.scalar(
            select(func.count()).select_from(OutboxEntry).where(OutboxEntry.task_id == task_id)
        )
    return int(count or 0)


async def _retried_events(sessions: SessionFactory, task_id: str) -> list[dict[str, Any]]:
    async with sessions() as session:
        rows = await session.scalars(
            select(TaskEvent.detail)
            .where(TaskEvent.task_id == task_id, TaskEvent.event == "retried")
            .order_by(TaskEvent.id)
        )
        return list(rows.all())


async def _load(sessions: SessionFactory, task_id: str) -> Task:
    async with sessions() as session:
        task = await session.get(Task, task_id)
    assert task is not None
    return task


@pytest.mark.parametrize("status", [TaskStatus.FAILED, TaskStatus.CANCELLED])
async def test_retry_takes_a_failed_or_cancelled_task_back_to_pending_through_the_outbox(
    api_client: httpx.AsyncClient, sessions: SessionFactory, status: TaskStatus
) -> None:
    task_id = await _task(sessions, status, attempts=3)
    before = utcnow()

    response = await api_client.post(f"{API}/tasks/{task_id}/retry")

    assert response.status_code == 200, response.text
    view = response.json()
    assert view["task_id"] == task_id
    assert view["status"] == "pending"
    assert view["attempts"] == 3  # attempts keep counting
    assert (view["error"], view["result"], view["finished_at"]) == (None, None, None)
    task = await _load(sessions, task_id)
    assert task.status == "pending"
    assert task.tries_base == 3  # the next attempt is try 1 of a fresh budget
    assert task.run_at is not None
    assert task.run_at >= before - timedelta(seconds=1)
    assert await _outbox_rows(sessions, task_id) == 1
    assert await _retried_events(sessions, task_id) == [{"by": "default", "attempts": 3}]
    events = (await api_client.get(f"{API}/tasks/{task_id}/events")).json()["events"]
    assert events[-1]["event"] == "retried"
    assert events[-1]["detail"] == {"by": "default", "attempts": 3}


async def test_retry_replaces_a_leftover_outbox_row(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    task_id = await _task(sessions, TaskStatus.FAILED)
    async with sessions.begin() as session:
        await session.execute(
            insert(OutboxEntry).values(task_id=task_id, created_at=utcnow() - timedelta(hours=1))
        )

    response = await api_client.post(f"{API}/tasks/{task_id}/retry")

    assert response.status_code == 200, response.text
    assert await _outbox_rows(sessions, task_id) == 1


@pytest.mark.parametrize(
    "status",
    [TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.SUCCEEDED],
)
async def test_retry_of_a_task_neither_failed_nor_cancelled_is_409_with_its_view(
    api_client: httpx.AsyncClient, sessions: SessionFactory, status: TaskStatus
) -> None:
    task_id = await _task(sessions, status)
    outbox_before = await _outbox_rows(sessions, task_id)

    response = await api_client.post(f"{API}/tasks/{task_id}/retry")

    assert response.status_code == 409, response.text
    view = response.json()
    assert view["task_id"] == task_id
    assert view["status"] == status.value
    assert (await _load(sessions, task_id)).status == status.value
    assert await _outbox_rows(sessions, task_id) == outbox_before
    assert await _retried_events(sessions, task_id) == []


@pytest.mark.parametrize("task_id", ["no-such-task", "x" * 300, "nul%01"])
async def test_retry_of_an_unknown_task_is_404(api_client: httpx.AsyncClient, task_id: str) -> None:
    response = await api_client.post(f"{API}/tasks/{task_id}/retry")
    assert response.status_code == 404, response.text


async def test_retry_of_another_accounts_task_is_404_and_changes_nothing(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    task_id = await _task(sessions, TaskStatus.FAILED, account="someone-else")

    response = await api_client.post(f"{API}/tasks/{task_id}/retry")

    assert response.status_code == 404, response.text
    assert (await _load(sessions, task_id)).status == "failed"
    assert await _outbox_rows(sessions, task_id) == 0


async def test_concurrent_retries_of_one_task_retry_it_once(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    task_id = await _task(sessions, TaskStatus.FAILED, attempts=2)

    responses = await asyncio.gather(
        *(api_client.post(f"{API}/tasks/{task_id}/retry") for _ in range(4))
    )

    codes = sorted(response.status_code for response in responses)
    assert codes == [200, 409, 409, 409], [r.text for r in responses]
    assert all(response.json()["status"] == "pending" for response in responses)
    assert await _retried_events(sessions, task_id) == [{"by": "default", "attempts": 2}]
    assert await _outbox_rows(sessions, task_id) == 1


async def test_retry_by_filter_takes_the_callers_matching_tasks(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    old_failed = await _task(sessions, TaskStatus.FAILED, ago_s=3600)
    failed = await _task(sessions, TaskStatus.FAILED)
    cancelled = await _task(sessions, TaskStatus.CANCELLED)
    other_name = await _task(sessions, TaskStatus.FAILED, name="non_blocking_long_running_task")
    succeeded = await _task(sessions, TaskStatus.SUCCEEDED)
    running = await _task(sessions, TaskStatus.RUNNING)
    foreign = await _task(sessions, TaskStatus.FAILED, account="someone-else")

    cutoff = (utcnow() - timedelta(seconds=1800)).isoformat()
    answer = await api_client.post(f"{API}/tasks/retry", json={"created_before": cutoff})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"count": 1, "remaining": 0}
    assert (await _load(sessions, old_failed)).status == "pending"

    answer = await api_client.post(
        f"{API}/tasks/retry", json={"status": "failed", "name": "greeting"}
    )
    assert answer.json() == {"count": 1, "remaining": 0}
    assert (await _load(sessions, failed)).status == "pending"
    assert (await _load(sessions, cancelled)).status == "cancelled"

    answer = await api_client.post(f"{API}/tasks/retry", json={})
    assert answer.json() == {"count": 2, "remaining": 0}
    for task_id in (cancelled, other_name):
        assert (await _load(sessions, task_id)).status == "pending"
        assert await _outbox_rows(sessions, task_id) == 1
        assert await _retried_events(sessions, task_id) == [{"by": "default", "attempts": 1}]
    assert (await _load(sessions, succeeded)).status == "succeeded"
    assert (await _load(sessions, running)).status == "running"
    assert (await _load(sessions, foreign)).status == "failed"

    answer = await api_client.post(f"{API}/tasks/retry", json={})
    assert answer.json() == {"count": 0, "remaining": 0}


async def test_retry_by_filter_is_bounded_per_call_and_counts_the_rest(
    engine: AsyncEngine, sessions: SessionFactory
) -> None:
    ids = [await _task(sessions, TaskStatus.FAILED, ago_s=100 - i) for i in range(5)]
    retries = RetryStore(engine)
    selection = RetryFilter(account="default")

    first = await retries.retry_matching(selection, now=utcnow(), limit=2)
    assert (first.count, first.remaining) == (2, 3)
    # Oldest first.
    assert [(await _load(sessions, task_id)).status for task_id in ids] == [
        "pending",
        "pending",
        "failed",
        "failed",
        "failed",
    ]
    second = await retries.retry_matching(selection, now=utcnow(), limit=2)
    third = await retries.retry_matching(selection, now=utcnow(), limit=2)
    assert [(second.count, second.remaining), (third.count, third.remaining)] == [
        (2, 1),
        (1, 0),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"state": "failed"}, "state"),
        ({"status": "pending"}, "status"),
        ({"status": ["failed"]}, "status"),
        ({"name": 5}, "name"),
        ({"name": ""}, "name"),
        ({"key": "Connector:salesforce"}, "key"),
        ({"key": "connector:"}, "key"),
        ({"key": ["connector:salesforce"]}, "key"),
        ({"key": 5}, "key"),
        ({"created_before": "2026-01-01T00:00:00"}, "created_before"),
        ({"created_before": 1700000000}, "created_before"),
    ],
)
async def test_retry_filter_is_validated_strictly(
    api_client: httpx.AsyncClient, sessions: SessionFactory, body: dict[str, Any], field: str
) -> None:
    task_id = await _task(sessions, TaskStatus.FAILED)

    response = await api_client.post(f"{API}/tasks/retry", json=body)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"][:2] == ["body", field]
    assert (await _load(sessions, task_id)).status == "failed"


@pytest.mark.parametrize("path", ["/tasks/{task_id}/retry", "/tasks/retry"])
async def test_a_retry_wakes_idle_relays(
    api_client: httpx.AsyncClient, sessions: SessionFactory, redis: Redis, path: str
) -> None:
    task_id = await _task(sessions, TaskStatus.FAILED)
    listener = redis.pubsub()
    await listener.subscribe(SUBMITTED_CHANNEL)

    async def announced() -> bool:
        message = await listener.get_message(ignore_subscribe_messages=True, timeout=0.1)
        return message is not None and message["channel"] == SUBMITTED_CHANNEL.encode()

    try:
        response = await api_client.post(API + path.format(task_id=task_id), json={})
        assert response.status_code == 200, response.text
        await wait_for(announced, message="the announcement")
    finally:
        await listener.aclose()  # type: ignore[no-untyped-call]
