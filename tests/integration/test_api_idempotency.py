"""Idempotency keys (SPEC "Idempotency", Guarantee 5) on SQLite and PostgreSQL.

The same key with the same request answers 200 with the original task and
``Idempotent-Replayed: true`` and writes nothing; with a different request, 422;
concurrent duplicates (which the intake's group commit puts in one transaction) make one
task. Single submits on the fast path and on FastAPI's (``api.fast_path``), and bulk.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import update

from throttler.db import SessionFactory
from throttler.models import Task
from throttler.settings import Settings
from throttler.statuses import TaskStatus

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory, RowCounter

GREETING = "/api/v1/task/greeting"
BULK = "/api/v1/tasks"
FAST = {"content-type": "application/json"}
# FastAPI takes this as JSON; the fast path declines it (tests/integration/test_api_fast_path.py).
STANDARD = {"content-type": "application/vnd.test+json"}


async def _post(
    client: httpx.AsyncClient,
    path: str,
    body: Any,
    *,
    key: str | None = None,
    headers: dict[str, str] = FAST,
) -> httpx.Response:
    sent = dict(headers)
    if key is not None:
        sent["Idempotency-Key"] = key
    return await client.post(path, content=json.dumps(body).encode(), headers=sent)


@pytest.mark.parametrize("headers", [FAST, STANDARD], ids=["fast", "standard"])
async def test_a_replay_answers_the_original_and_writes_nothing(
    api_client: httpx.AsyncClient, row_counts: RowCounter, headers: dict[str, str]
) -> None:
    first = await _post(api_client, GREETING, {"name": "Ada"}, key="order-1", headers=headers)
    assert first.status_code == 202, first.text
    assert "idempotent-replayed" not in first.headers
    written = await row_counts()

    again = await _post(api_client, GREETING, {"name": "Ada"}, key="order-1", headers=headers)

    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    assert await row_counts() == written


@pytest.mark.parametrize("headers", [FAST, STANDARD], ids=["fast", "standard"])
async def test_a_replay_answers_the_task_as_it_stands_now(
    api_client: httpx.AsyncClient, sessions: SessionFactory, headers: dict[str, str]
) -> None:
    first = await _post(api_client, GREETING, {"name": "Ada"}, key="order-9", headers=headers)
    assert first.status_code == 202, first.text
    task_id = first.json()["task_id"]
    finished = datetime(2026, 11, 29, 9, 0, tzinfo=UTC)
    async with sessions.begin() as session:
        await session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(
                status=TaskStatus.SUCCEEDED.value,
                attempts=1,
                result={"message": "Hello, Ada!"},
                finished_at=finished,
            )
        )

    again = await _post(api_client, GREETING, {"name": "Ada"}, key="order-9", headers=headers)

    assert again.status_code == 200, again.text
    # The intake's read-back gives the whole current view, exactly as a read of the task.
    assert again.json() == (await api_client.get(f"/api/v1/tasks/{task_id}")).json()
    assert again.json()["status"] == "succeeded"
    assert again.json()["result"] == {"message": "Hello, Ada!"}
    assert again.json()["finished_at"] == "2026-11-29T09:00:00Z"
    bulk = {"tasks": [{"name": "greeting", "input": {"name": "Ada"}, "idempotency_key": "order-9"}]}
    replayed = await _post(api_client, BULK, bulk, headers=headers)
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["tasks"] == [again.json()]


@pytest.mark.parametrize("headers", [FAST, STANDARD], ids=["fast", "standard"])
async def test_a_key_reused_for_another_request_is_a_422(
    api_client: httpx.AsyncClient, row_counts: RowCounter, headers: dict[str, str]
) -> None:
    first = await _post(api_client, GREETING, {"name": "Ada"}, key="k", headers=headers)
    assert first.status_code == 202
    written = await row_counts()

    other_input = await _post(api_client, GREETING, {"name": "Bob"}, key="k", headers=headers)
    other_kind = await _post(
        api_client, "/api/v1/task/download", {"url": "https://a.test/"}, key="k", headers=headers
    )
    other_option = await _post(api_client, GREETING + "?priority=9", {"name": "Ada"}, key="k")

    for response in (other_input, other_kind, other_option):
        assert response.status_code == 422, response.text
        assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert await row_counts() == written


async def test_a_delay_is_the_same_request_each_time_it_is_sent(
    api_client: httpx.AsyncClient,
) -> None:
    path = GREETING + "?delay_s=600"
    first = await _post(api_client, path, {"name": "Ada"}, key="later")
    again = await _post(api_client, path, {"name": "Ada"}, key="later")

    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json() == first.json()


async def test_concurrent_duplicates_make_one_task(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    before = await row_counts()
    answers = await asyncio.gather(
        *(
            _post(
                api_client,
                GREETING,
                {"name": "Ada"},
                key="once",
                headers=FAST if i % 2 else STANDARD,
            )
            for i in range(50)
        )
    )

    assert sorted(answer.status_code for answer in answers) == [200] * 49 + [202]
    assert len({answer.json()["task_id"] for answer in answers}) == 1
    after = await row_counts()
    assert {table: after[table] - before[table] for table in after} == {
        "tasks": 1,
        "outbox": 1,
        "task_events": 1,
    }


async def test_concurrent_duplicates_with_different_requests_make_one_task(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    answers = await asyncio.gather(
        *(_post(api_client, GREETING, {"name": f"n{i % 2}"}, key="race") for i in range(20))
    )

    created = [answer for answer in answers if answer.status_code == 202]
    assert len(created) == 1
    winner = created[0].json()
    for answer in answers:
        if answer.status_code == 200:  # the winner's request, replayed
            assert answer.json() == winner
        else:
            assert answer.status_code in (202, 422), answer.text
    assert (await row_counts())["tasks"] == 1


@pytest.mark.parametrize(
    "value",
    ["", "a b", "x" * 256, "tab\there", "caf\u00e9"],
    ids=["empty", "space", "too-long", "control", "non-ascii"],
)
async def test_a_malformed_key_is_a_422(
    api_client: httpx.AsyncClient, row_counts: RowCounter, value: str
) -> None:
    headers = [(b"content-type", b"application/json"), (b"idempotency-key", value.encode())]
    response = await api_client.post(GREETING, content=b'{"name": "Ada"}', headers=headers)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    assert (await row_counts())["tasks"] == 0


async def test_a_repeated_key_header_is_a_422(api_client: httpx.AsyncClient) -> None:
    headers = [
        ("content-type", "application/json"),
        ("idempotency-key", "a"),
        ("idempotency-key", "a"),
    ]
    response = await api_client.post(GREETING, content=b'{"name": "Ada"}', headers=headers)

    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]


async def test_a_key_of_255_visible_characters_is_taken(api_client: httpx.AsyncClient) -> None:
    key = "".join(chr(33 + i % 94) for i in range(255))
    first = await _post(api_client, GREETING, {"name": "Ada"}, key=key)
    again = await _post(api_client, GREETING, {"name": "Ada"}, key=key)

    assert (first.status_code, again.status_code) == (202, 200)


def _item(name: str, key: str | None, **extra: Any) -> dict[str, Any]:
    item: dict[str, Any] = {"name": "greeting", "input": {"name": name}, **extra}
    if key is not None:
        item["idempotency_key"] = key
    return item


@pytest.mark.parametrize("headers", [FAST, STANDARD], ids=["fast", "standard"])
async def test_a_bulk_replay(
    api_client: httpx.AsyncClient, row_counts: RowCounter, headers: dict[str, str]
) -> None:
    body = {"tasks": [_item("a", "b-1"), _item("b", None), _item("c", "b-2", priority=7)]}
    first = await _post(api_client, BULK, body, headers=headers)
    assert first.status_code == 202, first.text
    written = await row_counts()

    # Only keyed items replay: the same body again creates its unkeyed item anew.
    keyed = {"tasks": [body["tasks"][2], body["tasks"][0]]}
    again = await _post(api_client, BULK, keyed, headers=headers)

    assert again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    views = first.json()["tasks"]
    assert again.json()["tasks"] == [views[2], views[0]]
    assert await row_counts() == written

    mixed = {"tasks": [_item("d", "b-3"), body["tasks"][0]]}
    answer = await _post(api_client, BULK, mixed, headers=headers)
    assert answer.status_code == 202, answer.text
    assert "idempotent-replayed" not in answer.headers
    assert answer.json()["tasks"][1] == views[0]
    after = await row_counts()
    assert {table: after[table] - written[table] for table in after} == {
        "tasks": 1,
        "outbox": 1,
        "task_events": 1,
    }


async def test_a_bulk_item_reusing_a_key_writes_nothing_of_the_bulk(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    first = await _post(api_client, BULK, {"tasks": [_item("a", "k-1")]})
    assert first.status_code == 202
    written = await row_counts()

    body = {"tasks": [_item("new", "k-2"), _item("b", None), _item("changed", "k-1")]}
    answer = await _post(api_client, BULK, body)

    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [
        ["body", "tasks", 2, "idempotency_key"]
    ]
    assert await row_counts() == written
    # And k-2 is still free.
    free = await _post(api_client, BULK, {"tasks": [_item("other", "k-2")]})
    assert free.status_code == 202


async def test_a_bulk_reuse_in_a_shared_batch_fails_only_that_bulk(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    first = await _post(api_client, GREETING, {"name": "Ada"}, key="s-1")
    assert first.status_code == 202
    written = await row_counts()

    bad = {"tasks": [_item("new", "s-2"), _item("changed", "s-1")]}
    answers = await asyncio.gather(
        *(_post(api_client, GREETING, {"name": f"x{i}"}) for i in range(10)),
        _post(api_client, BULK, bad),
        *(_post(api_client, GREETING, {"name": f"y{i}"}) for i in range(10)),
    )

    codes = [answer.status_code for answer in answers]
    assert codes == [202] * 10 + [422] + [202] * 10, [
        a.text for a in answers if a.status_code != 202
    ]
    assert [(error["loc"], error["type"]) for error in answers[10].json()["detail"]] == [
        (["body", "tasks", 1, "idempotency_key"], "value_error")
    ]
    after = await row_counts()
    assert after["tasks"] - written["tasks"] == 20


async def test_a_key_twice_in_one_bulk_is_a_422(
    api_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    body = {"tasks": [_item("a", "same"), _item("b", "other"), _item("a", "same")]}
    answer = await _post(api_client, BULK, body)

    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [
        ["body", "tasks", 2, "idempotency_key"]
    ]
    assert (await row_counts())["tasks"] == 0


@pytest.mark.parametrize("key", ["", "a b", "x" * 256])
async def test_a_malformed_bulk_key_is_a_422(api_client: httpx.AsyncClient, key: str) -> None:
    answer = await _post(api_client, BULK, {"tasks": [_item("a", key)]})

    assert answer.status_code == 422, answer.text
    [error] = answer.json()["detail"]
    assert error["loc"] == ["body", "tasks", 0, "idempotency_key"]
    assert error["type"] == "string_pattern_mismatch"


async def test_a_single_submit_and_a_bulk_item_saying_the_same_share_a_key(
    api_client: httpx.AsyncClient,
) -> None:
    single = await _post(api_client, GREETING, {"name": "Ada"}, key="both")
    bulk = await _post(api_client, BULK, {"tasks": [_item("Ada", "both")]})

    assert (single.status_code, bulk.status_code) == (202, 200)
    assert bulk.json()["tasks"] == [single.json()]


async def test_each_account_has_its_own_keys(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    keyed = Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, api_keys="k1:a,k2:b"
    )
    async with make_api_client(keyed) as client:
        answers = [
            await _post(
                client,
                GREETING,
                {"name": "Ada"},
                key="shared",
                headers=FAST | {"authorization": f"Bearer {token}"},
            )
            for token in ("k1", "k2", "k1")
        ]

    assert [answer.status_code for answer in answers] == [202, 202, 200]
    first, other, replay = (answer.json()["task_id"] for answer in answers)
    assert first != other
    assert replay == first
