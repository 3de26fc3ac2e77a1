"""The submit endpoints' fast path answers exactly as FastAPI's own handling does.

A content type FastAPI takes as JSON but the fast path does not (``+json``) sends the
same request down FastAPI's path, for comparison.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

FAST = {"content-type": "application/json"}
STANDARD = {"content-type": "application/vnd.test+json"}
RESULT_PREFIX = "/api/v1/task/result/"
# Differ between any two submissions.
_PER_TASK = ("task_id", "created_at")

CASES: list[tuple[str, Any]] = [
    ("/api/v1/task/greeting", {"name": "Ada"}),
    ("/api/v1/task/download", {"url": "https://example.com/a"}),
    ("/api/v1/task/blocking_long_running_task", {"duration": 1}),
    ("/api/v1/task/non_blocking_long_running_task", {"duration": 2}),
]


def _comparable(view: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in view.items() if key not in _PER_TASK}


async def _post(
    client: httpx.AsyncClient, path: str, body: Any, headers: dict[str, str]
) -> httpx.Response:
    return await client.post(path, content=json.dumps(body).encode(), headers=headers)


@pytest.mark.parametrize(("path", "body"), CASES, ids=[case[0].rsplit("/", 1)[1] for case in CASES])
async def test_a_submission_answers_alike_on_both_paths(
    api_client: httpx.AsyncClient, path: str, body: Any
) -> None:
    fast = await _post(api_client, path, body, FAST)
    standard = await _post(api_client, path, body, STANDARD)

    for response in (fast, standard):
        assert response.status_code == 202, response.text
        assert response.headers["content-type"] == "application/json"
        task_id = response.json()["task_id"]
        assert response.headers["location"] == f"{RESULT_PREFIX}{task_id}"
        # What it says was accepted is what a read gives back.
        stored = await api_client.get(response.headers["location"])
        assert stored.json() == response.json()
    assert _comparable(fast.json()) == _comparable(standard.json())
    assert set(fast.json()) == set(standard.json())


async def test_a_bulk_submission_answers_alike_on_both_paths(api_client: httpx.AsyncClient) -> None:
    body = {"tasks": [{"name": path.rsplit("/", 1)[1], "input": task} for path, task in CASES]}

    fast = await _post(api_client, "/api/v1/tasks", body, FAST)
    standard = await _post(api_client, "/api/v1/tasks", body, STANDARD)

    assert fast.status_code == standard.status_code == 202
    assert fast.headers["content-type"] == standard.headers["content-type"]
    assert [_comparable(view) for view in fast.json()["tasks"]] == [
        _comparable(view) for view in standard.json()["tasks"]
    ]


@pytest.mark.parametrize(
    "body",
    [
        {"name": ""},
        {"name": "Ada", "admin": True},
        [],
        "Ada",
    ],
)
async def test_a_rejection_is_fastapis_own(api_client: httpx.AsyncClient, body: Any) -> None:
    fast = await _post(api_client, "/api/v1/task/greeting", body, FAST)
    standard = await _post(api_client, "/api/v1/task/greeting", body, STANDARD)

    assert fast.status_code == standard.status_code == 422
    assert fast.json() == standard.json()


async def test_a_key_is_checked_on_the_fast_path(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    keyed = Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, api_keys="k1:acme"
    )
    async with make_api_client(keyed) as client:
        for authorization, expected in (
            ("Bearer k1", 202),
            ("bearer k1", 202),
            ("Bearer k2", 401),
            ("Basic k1", 401),
            ("Bearer", 401),
        ):
            response = await client.post(
                "/api/v1/task/greeting",
                json={"name": "Ada"},
                headers={"authorization": authorization},
            )
            assert response.status_code == expected, authorization
        assert (await client.post("/api/v1/task/greeting", json={"name": "Ada"})).status_code == 401
