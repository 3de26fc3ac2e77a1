"""GET /tasks (filters, newest first, keyset pages), GET /tasks/{id} and its events."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import select, update

from throttler.db import SessionFactory
from throttler.models import Task, TaskEvent
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

TASKS = "/api/v1/tasks"
KEY_A = "key-a-0123456789abcdef"
KEY_B = "key-b-0123456789abcdef"
A = {"Authorization": f"Bearer {KEY_A}"}
B = {"Authorization": f"Bearer {KEY_B}"}


async def _bulk(client: httpx.AsyncClient, items: list[dict[str, Any]], **kw: Any) -> list[str]:
    response = await client.post(TASKS, json={"tasks": items}, **kw)
    assert response.status_code == 202, response.text
    return [task["task_id"] for task in response.json()["tasks"]]


def _greetings(count: int) -> list[dict[str, Any]]:
    return [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(count)]


async def _list(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    response = await client.get(TASKS, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def _all_pages(client: httpx.AsyncClient, **params: Any) -> list[str]:
    ids: list[str] = []
    cursor = None
    while True:
        page = await _list(client, **params, **({"cursor": cursor} if cursor else {}))
        ids += [task["task_id"] for task in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def _set_status(sessions: SessionFactory, ids: list[str], status: str) -> None:
    async with sessions() as session, session.begin():
        await session.execute(update(Task).where(Task.id.in_(ids)).values(status=status))


async def _created_order(sessions: SessionFactory, ids: list[str]) -> list[str]:
    """``ids`` newest first: created_at descending, then id descending."""
    async with sessions() as session:
        rows = (
            await session.execute(select(Task.created_at, Task.id).where(Task.id.in_(ids)))
        ).all()
    return [row.id for row in sorted(rows, key=lambda row: (row.created_at, row.id), reverse=True)]


async def test_list_is_newest_first_and_pages_are_stable_while_tasks_arrive(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    # A bulk batch shares one created_at: the id alone orders it, across page boundaries.
    old = [task_id for _ in range(3) for task_id in await _bulk(api_client, _greetings(9))]
    expected = await _created_order(sessions, old)

    seen: list[str] = []
    cursor = None
    while True:
        page = await _list(api_client, limit=4, **({"cursor": cursor} if cursor else {}))
        assert len(page["tasks"]) <= 4
        seen += [task["task_id"] for task in page["tasks"]]
        # Newer tasks between pages go before the first page, never into the rest.
        await _bulk(api_client, _greetings(2))
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert seen == expected
    everything = await _all_pages(api_client, limit=1000)
    assert len(everything) == len(old) + 2 * 7
    assert everything[-len(old) :] == expected


async def test_filters_by_status_name_and_creation_time(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    greetings = await _bulk(api_client, _greetings(6))
    downloads = await _bulk(
        api_client, [{"name": "download", "input": {"url": "https://example.com/a"}}] * 4
    )
    await _set_status(sessions, greetings[:2] + downloads[:1], "failed")
    await _set_status(sessions, greetings[2:3], "succeeded")
    await _set_status(sessions, downloads[1:2], "running")
    later = datetime.now(UTC) + timedelta(hours=1)
    async with sessions() as session, session.begin():
        await session.execute(update(Task).where(Task.id == greetings[5]).values(created_at=later))

    async def ids(**params: Any) -> set[str]:
        return set(await _all_pages(api_client, limit=2, **params))

    assert await ids(status="failed") == {*greetings[:2], downloads[0]}
    assert await ids(status=["failed", "running"]) == {*greetings[:2], *downloads[:2]}
    assert await ids(name="download") == set(downloads)
    assert await ids(name="greeting", status=["failed", "succeeded"]) == set(greetings[:3])
    assert await ids(name="nothing") == set()
    cut = (later - timedelta(minutes=1)).isoformat()
    assert await ids(created_after=cut) == {greetings[5]}
    assert await ids(created_before=cut) == set(greetings[:5] + downloads)
    assert await ids(created_before=cut, name="greeting", status="pending") == {*greetings[3:5]}
    # Filtered pages keep the newest-first order.
    listed = await _all_pages(api_client, limit=2, name="greeting")
    assert listed == await _created_order(sessions, greetings)


async def test_task_and_events_read_back_oldest_first(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    [task_id] = await _bulk(api_client, _greetings(1))
    async with sessions() as session, session.begin():
        submitted_at = (await session.get(Task, task_id)).created_at  # type: ignore[union-attr]
        session.add_all(
            [
                TaskEvent(
                    task_id=task_id,
                    at=submitted_at + timedelta(seconds=2),
                    event="started",
                    detail={"attempt": 1, "worker": "w1"},
                ),
                TaskEvent(
                    task_id=task_id,
                    at=submitted_at + timedelta(seconds=1),
                    event="queued",
                    detail={"relay": "r1"},
                ),
            ]
        )

    view = await api_client.get(f"{TASKS}/{task_id}")
    assert view.status_code == 200
    assert view.json() == (await api_client.get(f"/api/v1/task/result/{task_id}")).json()

    events = await api_client.get(f"{TASKS}/{task_id}/events")
    assert events.status_code == 200
    body = events.json()["events"]
    # In the order they were recorded (the history's ids), with their details.
    assert [(e["event"], e["detail"]) for e in body] == [
        ("submitted", {"account": "default"}),
        ("started", {"attempt": 1, "worker": "w1"}),
        ("queued", {"relay": "r1"}),
    ]
    assert all(datetime.fromisoformat(e["at"]).utcoffset() == timedelta(0) for e in body)


@pytest.mark.parametrize(
    "task_id", ["00000000-0000-4000-8000-000000000000", "x" * 500, "%00"], ids=str
)
async def test_unknown_task_is_404(api_client: httpx.AsyncClient, task_id: str) -> None:
    for path in (f"{TASKS}/{task_id}", f"{TASKS}/{task_id}/events"):
        response = await api_client.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "task not found"}


@pytest.fixture
async def keyed_client(
    settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    keyed = Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        api_keys=f"{KEY_A}:account-a,{KEY_B}:account-b",
    )
    async with make_api_client(keyed) as client:
        yield client


async def test_accounts_see_only_their_own_tasks(keyed_client: httpx.AsyncClient) -> None:
    mine = await _bulk(keyed_client, _greetings(3), headers=A)
    theirs = await _bulk(keyed_client, _greetings(2), headers=B)

    for headers, own in ((A, mine), (B, theirs)):
        page = await keyed_client.get(TASKS, params={"limit": 1000}, headers=headers)
        assert {t["task_id"] for t in page.json()["tasks"]} == set(own)
        filtered = await keyed_client.get(
            TASKS, params={"status": "pending", "name": "greeting"}, headers=headers
        )
        assert {t["task_id"] for t in filtered.json()["tasks"]} == set(own)
    for path in (f"{TASKS}/{theirs[0]}", f"{TASKS}/{theirs[0]}/events"):
        response = await keyed_client.get(path, headers=A)
        assert response.status_code == 404
        assert response.json() == {"detail": "task not found"}
        assert (await keyed_client.get(path, headers=B)).status_code == 200
    assert (await keyed_client.get(TASKS)).status_code == 401


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("status=done", "status"),
        ("status=pending&status=nope", "status"),
        ("created_after=yesterday", "created_after"),
        ("created_after=2026-11-29T10:00:00", "created_after"),
        ("created_before=1764403200", "created_before"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=%2B5", "limit"),
        ("limit=5&limit=6", "limit"),
        ("name=greeting&name=download", "name"),
        ("cursor=abc", "cursor"),
        ("cursor=eyJ4IjoxfQ", "cursor"),
        ("cursor=e30%3D", "cursor"),
        ("key=a", "key"),
        ("account=", "account"),  # open without API_KEYS, but never empty
        ("state=failed", "state"),
    ],
)
async def test_bad_query_is_422_naming_the_parameter(
    api_client: httpx.AsyncClient, query: str, field: str
) -> None:
    response = await api_client.get(f"{TASKS}?{query}")

    assert response.status_code == 422, response.text
    assert field in {error["loc"][1] for error in response.json()["detail"]}
