"""Submitting each task kind and reading it back, against a real database."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import select

from tests.support import event_history
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task

if TYPE_CHECKING:
    from tests.integration.conftest import RowCounter

SUBMISSIONS = [
    ("greeting", {"name": "Ada"}),
    ("download", {"url": "https://example.com/file.txt?x=1"}),
    ("blocking_long_running_task", {"duration": 3}),
    ("non_blocking_long_running_task", {"duration": 0}),
]


def _assert_utc_iso(value: Any) -> None:
    assert isinstance(value, str)
    assert datetime.fromisoformat(value).utcoffset() == timedelta(0)


@pytest.mark.parametrize(("name", "body"), SUBMISSIONS, ids=[name for name, _ in SUBMISSIONS])
async def test_submit_commits_task_outbox_and_event(
    api_client: httpx.AsyncClient, sessions: SessionFactory, name: str, body: dict[str, Any]
) -> None:
    response = await api_client.post(f"/api/v1/task/{name}", json=body)

    assert response.status_code == 202
    view = response.json()
    task_id = view["task_id"]
    assert view == {
        "task_id": task_id,
        "name": name,
        "status": "pending",
        "result": None,
        "error": None,
        "attempts": 0,
        "priority": 5,
        "keys": [],
        # No relay was asked: nothing ahead of it but the relay's next look.
        "waiting": {"reason": "turn", "scope": None, "until": None},
        "created_at": view["created_at"],
        "run_at": None,
        "queued_at": None,
        "started_at": None,
        "finished_at": None,
    }
    _assert_utc_iso(view["created_at"])
    assert response.headers["location"] == f"/api/v1/task/result/{task_id}"

    async with sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert (task.name, task.account, task.payload, task.status) == (
            name,
            "default",
            body,
            "pending",
        )
        outbox = (await session.scalars(select(OutboxEntry.task_id))).all()
        assert outbox == [task_id]
        assert await event_history(session, task_id) == ["submitted"]

    result = await api_client.get(response.headers["location"])
    assert result.status_code == 200
    # A read looks at the relays: none runs here.
    no_relay = {"reason": "no_relay", "scope": None, "until": None}
    assert result.json() == view | {"waiting": no_relay}


async def test_each_submission_is_its_own_task(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    first = await api_client.post("/api/v1/task/greeting", json={"name": "Ada"})
    second = await api_client.post("/api/v1/task/greeting", json={"name": "Ada"})

    assert first.json()["task_id"] != second.json()["task_id"]
    assert await row_counts() == {"tasks": 2, "outbox": 2, "task_events": 2}


@pytest.mark.parametrize(
    "task_id",
    [
        "00000000-0000-4000-8000-000000000000",
        "not-a-uuid",
        "x" * 500,
        "%27%20OR%201%3D1--",
    ],
    ids=["unknown-uuid", "not-a-uuid", "very-long", "quoted"],
)
async def test_unknown_task_is_404(api_client: httpx.AsyncClient, task_id: str) -> None:
    response = await api_client.get(f"/api/v1/task/result/{task_id}")

    assert response.status_code == 404
    assert response.json() == {"detail": "task not found"}


async def test_unknown_task_kind_is_404(api_client: httpx.AsyncClient) -> None:
    response = await api_client.post("/api/v1/task/rm_rf", json={"path": "/"})

    assert response.status_code == 404
