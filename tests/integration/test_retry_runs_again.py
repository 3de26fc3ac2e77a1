"""An explicitly retried task runs again: released by a real relay under its limit, run by a
real worker with a fresh budget of tries (``attempts`` keeps counting across the retry).
"""

from __future__ import annotations

import dataclasses
import itertools
import uuid
from typing import ClassVar

import httpx
from sqlalchemy import select

from tests.integration.conftest import ApiClientFactory
from tests.integration.worker_harness import (
    arq_pool,
    fast_retries,
    load_task,
    running_relay,
    running_worker,
    wait_final,
)
from tests.support import wait_for
from throttler.catalog import GREETING, GreetingInput
from throttler.db import SessionFactory
from throttler.limits import RuleSet
from throttler.models import TaskEvent
from throttler.settings import Settings
from throttler.throttle import build_limiter
from worker.taskkit import Resources, RetriableTask, SideEffectingTask
from worker.tasks.greeting import GreetingOutput

API = "/api/v1"
MAX_TRIES = 2
RULES = "task:greeting rate=2/s burst=1"
INTERVAL_S = 0.5


class AlwaysFails(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        raise ConnectionError("still down")


class SendsOnceThenWorks(
    SideEffectingTask[GreetingInput, GreetingOutput],
    spec=dataclasses.replace(GREETING, side_effecting=True),
):
    """Side-effecting: the first send fails, any later one works."""

    output_model = GreetingOutput
    sent: ClassVar[list[str]] = []

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        self.sent.append(params.name)
        if self.sent.count(params.name) == 1:
            raise ConnectionError("SMTP connection reset")
        return GreetingOutput(message=f"Hello, {params.name}!")


async def _events(sessions: SessionFactory, task_id: str) -> list[TaskEvent]:
    async with sessions() as session:
        rows = await session.scalars(
            select(TaskEvent).where(TaskEvent.task_id == task_id).order_by(TaskEvent.id)
        )
        return list(rows.all())


async def _ended_after_retry(sessions: SessionFactory, task_id: str) -> list[TaskEvent]:
    """The task's events once an attempt after its ``retried`` event has ended it."""

    async def probe() -> list[TaskEvent] | None:
        events = await _events(sessions, task_id)
        kinds = [event.event for event in events]
        after = kinds[kinds.index("retried") + 1 :] if "retried" in kinds else []
        return events if after and after[-1] in ("failed", "succeeded") else None

    events = await wait_for(probe, timeout_s=60, message=f"task {task_id} to end after retry")
    assert events is not None
    return events


async def _submit(client: httpx.AsyncClient, name: str) -> str:
    response = await client.post(f"{API}/task/greeting", json={"name": name})
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


async def _retry(client: httpx.AsyncClient, task_id: str, *, attempts: int) -> None:
    response = await client.post(f"{API}/tasks/{task_id}/retry")
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending"
    assert response.json()["attempts"] == attempts


async def test_a_task_that_used_its_tries_runs_again_under_the_limit_when_retried(
    settings: Settings, sessions: SessionFactory, make_api_client: ApiClientFactory
) -> None:
    settings = fast_retries(settings, relay_limits=RULES, worker_max_tries=MAX_TRIES)
    async with (
        make_api_client(settings) as client,
        arq_pool(settings) as pool,
        running_relay(
            settings, sessions, pool, limiter=build_limiter(redis=pool, rules=RuleSet.parse(RULES))
        ),
        running_worker(settings, tasks=[AlwaysFails]),
    ):
        task_id = await _submit(client, "down")
        first = await wait_final(sessions, task_id, timeout_s=60)
        assert first.status == "failed"
        assert first.attempts == MAX_TRIES
        await _retry(client, task_id, attempts=MAX_TRIES)
        events = await _ended_after_retry(sessions, task_id)
        task = await load_task(sessions, task_id)

    assert task.status == "failed"
    assert task.attempts == 2 * MAX_TRIES  # attempts keep counting
    assert task.error == f"ConnectionError: still down (gave up after {MAX_TRIES} attempts)"
    kinds = [event.event for event in events]
    one_run = ["queued", "started", "retrying", "queued", "started", "failed"]
    assert kinds == ["submitted", *one_run, "retried", *one_run]
    retried = next(event for event in events if event.event == "retried")
    assert retried.detail == {"by": "default", "attempts": MAX_TRIES}
    started = [event.detail["attempt"] for event in events if event.event == "started"]
    assert started == [1, 2, 3, 4]
    # Every release, before and after the retry, was granted by the task's rate limit.
    released = [event.at.timestamp() for event in events if event.event == "queued"]
    assert min(b - a for a, b in itertools.pairwise(released)) >= INTERVAL_S - 1e-3
    assert released[2] >= retried.at.timestamp()


async def test_a_failed_side_effecting_task_runs_once_more_when_retried(
    settings: Settings, sessions: SessionFactory, make_api_client: ApiClientFactory
) -> None:
    settings = fast_retries(settings)
    name = f"mail-{uuid.uuid4().hex}"
    async with (
        make_api_client(settings) as client,
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings, tasks=[SendsOnceThenWorks]),
    ):
        task_id = await _submit(client, name)
        first = await wait_final(sessions, task_id, timeout_s=60)
        assert first.status == "failed"
        assert first.error is not None
        assert "not retried" in first.error
        await _retry(client, task_id, attempts=1)
        events = await _ended_after_retry(sessions, task_id)
        task = await load_task(sessions, task_id)

    assert task.status == "succeeded"
    assert task.attempts == 2
    assert SendsOnceThenWorks.sent.count(name) == 2
    assert [event.event for event in events] == [
        "submitted",
        "queued",
        "started",
        "failed",
        "retried",
        "queued",
        "started",
        "succeeded",
    ]
