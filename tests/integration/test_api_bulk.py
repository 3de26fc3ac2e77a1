"""POST /api/v1/tasks: many tasks in one request, validated in full, written all or none."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import select

from api.schemas import MAX_BULK_TASKS
from tests.support import event_history
from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task

if TYPE_CHECKING:
    from tests.integration.conftest import RowCounter

BULK = "/api/v1/tasks"
MIXED: list[dict[str, Any]] = [
    {"name": "greeting", "input": {"name": "Ada"}},
    {"name": "download", "input": {"url": "https://Example.com/a.txt"}, "priority": 9},
    {"name": "blocking_long_running_task", "input": {"duration": 3}, "delay_s": 60},
    {
        "name": "non_blocking_long_running_task",
        "input": {"duration": 0},
        "priority": 0,
        "run_at": "2999-01-01T00:00:00+00:00",
    },
]
NOTHING = {"tasks": 0, "outbox": 0, "task_events": 0}


def _greetings(count: int) -> dict[str, Any]:
    return {"tasks": [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(count)]}


async def test_bulk_commits_every_task_with_its_options(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    # run_at 2999 is beyond the 30-day cap; use a time inside it.
    items = [dict(item) for item in MIXED]
    run_at = (datetime.now().astimezone() + timedelta(days=1)).replace(microsecond=0)
    items[3]["run_at"] = run_at.isoformat()

    response = await api_client.post(BULK, json={"tasks": items})

    assert response.status_code == 202
    views = response.json()["tasks"]
    assert [view["name"] for view in views] == [item["name"] for item in items]
    assert [view["status"] for view in views] == ["pending"] * 4
    assert [view["priority"] for view in views] == [5, 9, 5, 0]
    async with sessions() as session:
        tasks = [await session.get(Task, view["task_id"]) for view in views]
        assert all(task is not None for task in tasks)
        stored = [task for task in tasks if task is not None]
        assert [task.payload for task in stored] == [item["input"] for item in items]
        assert [task.priority for task in stored] == [5, 9, 5, 0]
        assert stored[1].host == "example.com"
        assert stored[0].run_at is None
        assert stored[2].run_at == stored[2].created_at + timedelta(seconds=60)
        assert stored[3].run_at == run_at
        outboxed = set(await session.scalars(select(OutboxEntry.task_id)))
        assert outboxed == {view["task_id"] for view in views}
        for view in views:
            assert await event_history(session, view["task_id"]) == ["submitted"]
    # Each task reads back at its own result URL.
    result = await api_client.get(f"/api/v1/task/result/{views[1]['task_id']}")
    no_relay = {"reason": "no_relay", "scope": None, "until": None}
    assert result.json() == views[1] | {"waiting": no_relay}
    # The 202 asks no relay: a task waits for its run_at, or its turn.
    assert [view["waiting"]["reason"] for view in views] == [
        "turn",
        "turn",
        "scheduled",
        "scheduled",
    ]
    assert views[3]["waiting"]["until"] == views[3]["run_at"]


async def test_bulk_of_the_maximum_size_is_accepted(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    response = await api_client.post(BULK, json=_greetings(MAX_BULK_TASKS))

    assert response.status_code == 202
    assert len(response.json()["tasks"]) == MAX_BULK_TASKS
    assert await row_counts() == dict.fromkeys(NOTHING, MAX_BULK_TASKS)


@pytest.mark.parametrize(
    ("item", "loc", "kind"),
    [
        ({"name": "greeting", "input": {"nom": "Ada"}}, ["input", "name"], "missing"),
        ({"name": "greeting", "input": {"name": ""}}, ["input", "name"], "string_too_short"),
        ({"name": "download", "input": {"url": "ftp://x"}}, ["input", "url"], "value_error"),
        ({"name": "greeting", "input": {"name": "A", "x": 1}}, ["input", "x"], "extra_forbidden"),
        ({"name": "rm_rf", "input": {}}, ["name"], "value_error"),
        ({"name": "greeting", "input": {"name": "A"}, "colour": 1}, ["colour"], "extra_forbidden"),
        (
            {"name": "greeting", "input": {"name": "A"}, "priority": 10},
            ["priority"],
            "less_than_equal",
        ),
        ({"name": "greeting", "input": {"name": "A"}, "priority": "9"}, ["priority"], "int_type"),
        (
            {
                "name": "greeting",
                "input": {"name": "A"},
                "delay_s": 1,
                "run_at": "2030-01-01T00:00:00Z",
            },
            ["run_at"],
            "value_error",
        ),
        (
            {"name": "greeting", "input": {"name": "A"}, "run_at": "2999-01-01T00:00:00Z"},
            ["run_at"],
            "less_than_equal",
        ),
    ],
    ids=[
        "missing-field",
        "empty-name",
        "bad-url",
        "unknown-input-field",
        "unknown-task-name",
        "unknown-item-field",
        "priority-too-high",
        "priority-as-string",
        "delay-and-run-at",
        "run-at-too-far",
    ],
)
async def test_one_invalid_item_rejects_the_request_naming_it(
    api_client: httpx.AsyncClient,
    row_counts: RowCounter,
    item: dict[str, Any],
    loc: list[str],
    kind: str,
) -> None:
    items = [dict(MIXED[0]), dict(MIXED[1]), dict(MIXED[2]), item]

    response = await api_client.post(BULK, json={"tasks": items})

    assert response.status_code == 422
    errors = response.json()["detail"]
    named = [(error["loc"], error["type"]) for error in errors]
    assert (["body", "tasks", 3, *loc], kind) in named
    assert all(error_loc[:3] == ["body", "tasks", 3] for error_loc, _ in named)
    if kind == "value_error" and loc == ["name"]:
        assert "rm_rf" in errors[0]["msg"]
    assert await row_counts() == NOTHING


@pytest.mark.parametrize(
    "body",
    [{"tasks": []}, {}, {"tasks": {}}, {"tasks": [], "extra": 1}, []],
    ids=["empty", "missing", "not-a-list", "extra-field", "not-an-object"],
)
async def test_malformed_batch_is_422(
    api_client: httpx.AsyncClient, row_counts: RowCounter, body: Any
) -> None:
    response = await api_client.post(BULK, json=body)

    assert response.status_code == 422
    assert await row_counts() == NOTHING


async def test_more_than_the_maximum_is_413(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    response = await api_client.post(BULK, json=_greetings(MAX_BULK_TASKS + 1))

    assert response.status_code == 413
    assert response.json() == {"detail": f"more than {MAX_BULK_TASKS} items in 'tasks'"}
    assert await row_counts() == NOTHING


async def test_oversized_body_is_413(api_client: httpx.AsyncClient, row_counts: RowCounter) -> None:
    url = "https://example.com/" + "a" * 2000
    item = {"name": "download", "input": {"url": url}}

    response = await api_client.post(BULK, json={"tasks": [item] * 3000})

    assert response.status_code == 413
    assert await row_counts() == NOTHING


async def test_query_options_are_refused(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    response = await api_client.post(f"{BULK}?priority=9", json=_greetings(1))

    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["query", "priority"]
    assert await row_counts() == NOTHING


async def test_megabytes_of_tiny_items_are_413_without_parsing_them(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    body = b'{"tasks": [' + b",".join([b"{}"] * 1_300_000) + b"]}"  # about 4 MiB

    response = await api_client.post(
        BULK, content=body, headers={"content-type": "application/json"}
    )

    assert response.status_code == 413
    assert len(response.content) < 200
    assert await row_counts() == NOTHING


async def test_a_huge_invalid_input_is_echoed_short(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    items: list[dict[str, Any]] = [{"name": "greeting", "input": {"name": list(range(100_000))}}]

    response = await api_client.post(BULK, json={"tasks": items})

    assert response.status_code == 422
    assert len(response.content) < 1000
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "tasks", 0, "input", "name"]
    assert error["input"].startswith("[0, 1, 2, ")
    assert error["input"].endswith("...")
    assert await row_counts() == NOTHING


async def test_a_thousand_invalid_items_answer_a_short_list(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    items = [{"name": "greeting", "input": {"name": "x" * 1000}}] * MAX_BULK_TASKS

    response = await api_client.post(BULK, json={"tasks": items})

    assert response.status_code == 422
    assert len(response.content) < 30_000
    errors = response.json()["detail"]
    assert errors[-1]["type"] == "too_many_errors"
    assert all(len(error["input"]) <= 203 for error in errors[:-1])
    assert await row_counts() == NOTHING
