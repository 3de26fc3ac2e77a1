"""Rejected requests: 422 names the field, 413 for big bodies, and nothing is written."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from throttler.catalog import MAX_DURATION_S, MAX_URL_LENGTH
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory, RowCounter

NOTHING_WRITTEN = {"tasks": 0, "outbox": 0, "task_events": 0}
GREETING = "/api/v1/task/greeting"
DOWNLOAD = "/api/v1/task/download"
BLOCKING = "/api/v1/task/blocking_long_running_task"
NON_BLOCKING = "/api/v1/task/non_blocking_long_running_task"
NAME = ("body", "name")
URL = ("body", "url")
DURATION = ("body", "duration")

# (id, path, JSON body or raw bytes, the loc the 422 must name)
INVALID: list[tuple[str, str, Any, tuple[Any, ...]]] = [
    ("name-missing", GREETING, {}, NAME),
    ("name-null", GREETING, {"name": None}, NAME),
    ("name-int", GREETING, {"name": 5}, NAME),
    ("name-list", GREETING, {"name": ["Ada"]}, NAME),
    ("name-empty", GREETING, {"name": ""}, NAME),
    ("name-201-chars", GREETING, {"name": "x" * 201}, NAME),
    ("name-extra-field", GREETING, {"name": "Ada", "admin": True}, ("body", "admin")),
    ("duration-missing", BLOCKING, {}, DURATION),
    ("duration-string", BLOCKING, {"duration": "5"}, DURATION),
    ("duration-float", BLOCKING, {"duration": 1.5}, DURATION),
    ("duration-bool", BLOCKING, {"duration": True}, DURATION),
    ("duration-negative", BLOCKING, {"duration": -1}, DURATION),
    ("duration-over-max", BLOCKING, {"duration": MAX_DURATION_S + 1}, DURATION),
    ("nb-duration-string", NON_BLOCKING, {"duration": "5"}, DURATION),
    ("nb-duration-negative", NON_BLOCKING, {"duration": -1}, DURATION),
    ("nb-duration-over-max", NON_BLOCKING, {"duration": MAX_DURATION_S + 1}, DURATION),
    ("nb-extra-field", NON_BLOCKING, {"duration": 1, "x": 1}, ("body", "x")),
    ("url-missing", DOWNLOAD, {}, URL),
    ("url-int", DOWNLOAD, {"url": 5}, URL),
    ("url-ftp", DOWNLOAD, {"url": "ftp://example.com/file"}, URL),
    ("url-javascript", DOWNLOAD, {"url": "javascript:alert(1)"}, URL),
    ("url-file", DOWNLOAD, {"url": "file:///etc/passwd"}, URL),
    ("url-relative", DOWNLOAD, {"url": "/etc/passwd"}, URL),
    ("url-no-host", DOWNLOAD, {"url": "http://"}, URL),
    ("url-empty-host", DOWNLOAD, {"url": "https:///path"}, URL),
    ("url-empty", DOWNLOAD, {"url": ""}, URL),
    ("url-too-long", DOWNLOAD, {"url": "https://example.com/" + "a" * MAX_URL_LENGTH}, URL),
    ("json-malformed", GREETING, b'{"name": "Ada"', ("body",)),
    ("json-array", GREETING, b'["Ada"]', ("body",)),
    ("json-string", GREETING, b'"Ada"', ("body",)),
    ("json-null", GREETING, b"null", ("body",)),
    ("body-empty", BLOCKING, b"", ("body",)),
]


@pytest.mark.parametrize(
    ("path", "body", "loc"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
async def test_invalid_input_is_422_naming_the_field_and_writes_nothing(
    api_client: httpx.AsyncClient,
    row_counts: RowCounter,
    path: str,
    body: Any,
    loc: tuple[Any, ...],
) -> None:
    if isinstance(body, bytes):
        response = await api_client.post(
            path, content=body, headers={"content-type": "application/json"}
        )
    else:
        response = await api_client.post(path, json=body)

    assert response.status_code == 422
    locs = [tuple(error["loc"][: len(loc)]) for error in response.json()["detail"]]
    assert loc in locs
    assert await row_counts() == NOTHING_WRITTEN


async def test_malformed_json_is_422_not_400(api_client: httpx.AsyncClient) -> None:
    response = await api_client.post(
        GREETING, content=b"{name: Ada}", headers={"content-type": "application/json"}
    )

    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


SMALL_LIMIT = 1024


@pytest.fixture
async def small_limit_client(
    settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    capped = Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        api_max_body_bytes=SMALL_LIMIT,
    )
    async with make_api_client(capped) as client:
        yield client


async def test_oversized_body_with_content_length_is_413(
    small_limit_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    response = await small_limit_client.post(GREETING, json={"name": "x" * SMALL_LIMIT})

    assert response.request.headers["content-length"]
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body exceeds {SMALL_LIMIT} bytes"}
    assert await row_counts() == NOTHING_WRITTEN


async def test_oversized_chunked_body_is_413(
    small_limit_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": "'
        for _ in range(SMALL_LIMIT // 100 + 1):
            yield b"x" * 100
        yield b'"}'

    response = await small_limit_client.post(
        GREETING, content=chunks(), headers={"content-type": "application/json"}
    )

    assert "content-length" not in response.request.headers
    assert response.status_code == 413
    assert await row_counts() == NOTHING_WRITTEN


async def test_chunked_body_under_the_limit_is_accepted(
    small_limit_client: httpx.AsyncClient, row_counts: RowCounter
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"name": '
        yield b'"Ada"}'

    response = await small_limit_client.post(
        GREETING, content=chunks(), headers={"content-type": "application/json"}
    )

    assert response.status_code == 202
    assert await row_counts() == {"tasks": 1, "outbox": 1, "task_events": 1}


async def test_a_long_invalid_value_is_echoed_short(api_client: httpx.AsyncClient) -> None:
    response = await api_client.post(GREETING, json={"name": "x" * 60_000})

    assert response.status_code == 422
    assert len(response.content) < 1000
    [error] = response.json()["detail"]
    assert error["input"] == "x" * 200 + "..."
