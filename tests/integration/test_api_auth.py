"""API keys: each key is an account, and accounts cannot see each other's tasks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import httpx
import pytest

from throttler.constants import DEFAULT_ACCOUNT
from throttler.db import SessionFactory
from throttler.models import Task
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory, RowCounter

GREETING = "/api/v1/task/greeting"
KEY_A = "key-a-0123456789"
KEY_B = "key-b-0123456789"


def _bearer(key: str) -> httpx.Headers:
    return httpx.Headers({"Authorization": f"Bearer {key}"})


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


@pytest.mark.parametrize(
    "headers",
    [
        httpx.Headers(),
        _bearer("wrong-key"),
        _bearer(KEY_A[:-1]),
        _bearer(KEY_A + "x"),
        httpx.Headers({"Authorization": KEY_A}),
        httpx.Headers({"Authorization": f"Basic {KEY_A}"}),
        httpx.Headers({"Authorization": "Bearer"}),
        httpx.Headers({b"Authorization": "Bearer ключ".encode()}),
    ],
    ids=["none", "wrong", "prefix", "longer", "no-scheme", "basic", "empty", "non-ascii"],
)
async def test_submit_without_a_valid_key_is_401_and_writes_nothing(
    keyed_client: httpx.AsyncClient, row_counts: RowCounter, headers: httpx.Headers
) -> None:
    response = await keyed_client.post(GREETING, json={"name": "Ada"}, headers=headers)

    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert await row_counts() == {"tasks": 0, "outbox": 0, "task_events": 0}


async def test_task_belongs_to_the_key_account_and_is_hidden_from_others(
    keyed_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    submitted = await keyed_client.post(GREETING, json={"name": "Ada"}, headers=_bearer(KEY_A))
    assert submitted.status_code == 202
    location = submitted.headers["location"]
    task_id = submitted.json()["task_id"]

    async with sessions() as session:
        task = await session.get(Task, task_id)
        assert task is not None
        assert task.account == "account-a"

    own = await keyed_client.get(location, headers=_bearer(KEY_A))
    assert own.status_code == 200
    # Read back with no relay running, the view says so.
    no_relay = {"reason": "no_relay", "scope": None, "until": None}
    assert own.json() == submitted.json() | {"waiting": no_relay}

    # Same answer as for an id that never existed: no hint that the task is there.
    other = await keyed_client.get(location, headers=_bearer(KEY_B))
    unknown = await keyed_client.get(
        "/api/v1/task/result/00000000-0000-4000-8000-000000000000", headers=_bearer(KEY_B)
    )
    assert (other.status_code, other.json()) == (unknown.status_code, unknown.json())
    assert other.status_code == 404

    anonymous = await keyed_client.get(location)
    assert anonymous.status_code == 401


async def test_without_api_keys_tasks_go_to_the_default_account(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    # A stray Authorization header is ignored when authentication is off.
    response = await api_client.post(GREETING, json={"name": "Ada"}, headers=_bearer("any"))

    assert response.status_code == 202
    async with sessions() as session:
        task = await session.get(Task, response.json()["task_id"])
        assert task is not None
        assert task.account == DEFAULT_ACCOUNT
