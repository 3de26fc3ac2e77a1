"""The submit endpoints' fast path runs for plain requests and answers as FastAPI does.

FastAPI's own handling solves each request's dependencies with
``fastapi.routing.solve_dependencies``; the fast path (``api.fast_path``) never calls
it. Counting its calls tells which path served a request: a plain request must not
reach it, anything else must. A content type FastAPI takes as JSON but the fast path
does not (``+json``) sends the same request down FastAPI's path, for comparison.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import fastapi.routing
import httpx
import pytest
from fastapi.dependencies.utils import solve_dependencies

from api.app import create_app
from api.fast_path import FastPathRoute, fast_plan
from api.routes import tasks
from api.submit_options import SubmitOptions, get_submit_options
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

FAST = {"content-type": "application/json"}
STANDARD = {"content-type": "application/vnd.test+json"}
RESULT_PREFIX = "/api/v1/task/result/"
# Differ between any two submissions.
_PER_TASK = ("task_id", "created_at")
# Headers that carry a task id or the body's length (which follows the id and the time).
_PER_RESPONSE_HEADERS = ("location", "content-length")

CASES: list[tuple[str, Any]] = [
    ("/api/v1/task/greeting", {"name": "Ada"}),
    ("/api/v1/task/download", {"url": "https://example.com/a"}),
    ("/api/v1/task/blocking_long_running_task", {"duration": 1}),
    ("/api/v1/task/non_blocking_long_running_task", {"duration": 2}),
]


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every request FastAPI's own handling served (it solved its dependencies)."""
    paths: list[str] = []
    solve = solve_dependencies  # what fastapi.routing calls

    async def counting(**kwargs: Any) -> Any:
        paths.append(kwargs["request"].url.path)
        return await solve(**kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return paths


def _comparable(view: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in view.items() if key not in _PER_TASK}


def _headers(response: httpx.Response) -> list[tuple[str, str]]:
    """Every header in order, the per-response ones by name only."""
    return [
        (name, "" if name in _PER_RESPONSE_HEADERS else value)
        for name, value in response.headers.multi_items()
    ]


def _assert_alike(fast: httpx.Response, standard: httpx.Response) -> None:
    assert fast.status_code == standard.status_code
    assert _headers(fast) == _headers(standard)
    fast_body, standard_body = fast.json(), standard.json()
    if isinstance(fast_body, dict) and "tasks" in fast_body:
        fast_body = [_comparable(view) for view in fast_body["tasks"]]
        standard_body = [_comparable(view) for view in standard_body["tasks"]]
    elif isinstance(fast_body, dict) and "task_id" in fast_body:
        fast_body, standard_body = _comparable(fast_body), _comparable(standard_body)
    assert fast_body == standard_body


async def _post(
    client: httpx.AsyncClient,
    path: str,
    body: Any,
    headers: dict[str, str],
    *,
    query: str = "",
) -> httpx.Response:
    return await client.post(path + query, content=json.dumps(body).encode(), headers=headers)


@pytest.mark.parametrize(("path", "body"), CASES, ids=[case[0].rsplit("/", 1)[1] for case in CASES])
async def test_a_submission_answers_alike_on_both_paths(
    api_client: httpx.AsyncClient, solved: list[str], path: str, body: Any
) -> None:
    fast = await _post(api_client, path, body, FAST)
    assert solved == []  # the fast path served it
    standard = await _post(api_client, path, body, STANDARD)
    assert solved == [path]  # FastAPI served it

    for response in (fast, standard):
        assert response.status_code == 202, response.text
        assert response.headers["content-type"] == "application/json"
        task_id = response.json()["task_id"]
        assert response.headers["location"] == f"{RESULT_PREFIX}{task_id}"
        # What it says was accepted is what a read gives back; the read also looks at
        # the relays (none runs here), where the 202 asks none.
        stored = await api_client.get(response.headers["location"])
        assert response.json()["waiting"] == {"reason": "turn", "scope": None, "until": None}
        no_relay = {"reason": "no_relay", "scope": None, "until": None}
        assert stored.json() == response.json() | {"waiting": no_relay}
    _assert_alike(fast, standard)
    assert set(fast.json()) == set(standard.json())


async def test_a_bulk_submission_answers_alike_on_both_paths(
    api_client: httpx.AsyncClient, solved: list[str]
) -> None:
    body = {"tasks": [{"name": path.rsplit("/", 1)[1], "input": task} for path, task in CASES]}

    fast = await _post(api_client, "/api/v1/tasks", body, FAST)
    assert solved == []
    standard = await _post(api_client, "/api/v1/tasks", body, STANDARD)
    assert solved == ["/api/v1/tasks"]

    assert fast.status_code == standard.status_code == 202
    assert fast.headers["content-type"] == standard.headers["content-type"]
    _assert_alike(fast, standard)
    assert len(fast.json()["tasks"]) == len(CASES)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/v1/task/greeting", {"name": ""}),
        ("/api/v1/task/greeting", {"name": "Ada", "admin": True}),
        ("/api/v1/task/greeting", []),
        ("/api/v1/task/greeting", "Ada"),
        ("/api/v1/tasks", {"tasks": []}),
        # A valid batch whose item fails the item's own model: the endpoint's own 422,
        # raised by the endpoint on either path.
        ("/api/v1/tasks", {"tasks": [{"name": "greeting", "input": {"name": ""}}]}),
        ("/api/v1/tasks", {"tasks": [{"name": "nope", "input": {}}]}),
    ],
)
async def test_a_rejection_is_fastapis_own(
    api_client: httpx.AsyncClient, solved: list[str], path: str, body: Any
) -> None:
    fast = await _post(api_client, path, body, FAST)
    standard = await _post(api_client, path, body, STANDARD)

    assert fast.status_code == standard.status_code == 422
    assert fast.json() == standard.json()
    assert _headers(fast) == _headers(standard)


async def test_an_invalid_body_goes_to_fastapi(
    api_client: httpx.AsyncClient, solved: list[str]
) -> None:
    bodies: tuple[Any, ...] = ({"name": ""}, [], "Ada")
    for body in bodies:
        await _post(api_client, "/api/v1/task/greeting", body, FAST)
    assert solved == ["/api/v1/task/greeting"] * 3


async def test_invalid_json_is_fastapis_own_422(
    api_client: httpx.AsyncClient, solved: list[str]
) -> None:
    raw = b'{"name": "Ada", "name": "Bob"}'
    fast = await api_client.post("/api/v1/task/greeting", content=raw, headers=FAST)
    standard = await api_client.post("/api/v1/task/greeting", content=raw, headers=STANDARD)

    assert fast.status_code == standard.status_code == 422
    assert fast.json() == standard.json()
    assert fast.json()["detail"][0]["type"] == "json_invalid"
    assert solved == []  # FastAPI refuses unparsable JSON before solving anything


@pytest.mark.parametrize(
    ("query", "expected"), [("?priority=7", 202), ("?delay=30", 422), ("?priority=10", 422)]
)
async def test_a_query_string_goes_to_fastapi(
    api_client: httpx.AsyncClient, solved: list[str], query: str, expected: int
) -> None:
    response = await _post(api_client, "/api/v1/task/greeting", {"name": "Ada"}, FAST, query=query)

    assert response.status_code == expected, response.text
    assert solved == ["/api/v1/task/greeting"]
    if expected == 202:
        assert response.json()["priority"] == 7


async def test_a_key_is_checked_on_the_fast_path(
    settings: Settings, make_api_client: ApiClientFactory, solved: list[str]
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
            (None, 401),
        ):
            headers = {} if authorization is None else {"authorization": authorization}
            solved.clear()
            fast = await _post(client, "/api/v1/task/greeting", {"name": "Ada"}, FAST | headers)
            # An accepted key stays on the fast path; a refused one is refused before
            # either path reads the body (api.key_first), as FastAPI would refuse it.
            assert solved == []
            standard = await _post(
                client, "/api/v1/task/greeting", {"name": "Ada"}, STANDARD | headers
            )
            assert fast.status_code == expected, authorization
            _assert_alike(fast, standard)
            if expected == 401:
                bodiless = await client.post("/api/v1/task/greeting", headers=FAST | headers)
                assert solved == ["/api/v1/task/greeting"]  # FastAPI's own refusal
                _assert_alike(fast, bodiless)


async def test_an_oversized_body_is_refused_before_either_path(
    api_client: httpx.AsyncClient, solved: list[str]
) -> None:
    body = {"name": "x" * 70_000}
    fast = await _post(api_client, "/api/v1/task/greeting", body, FAST)
    standard = await _post(api_client, "/api/v1/task/greeting", body, STANDARD)

    assert fast.status_code == standard.status_code == 413
    _assert_alike(fast, standard)
    assert solved == []


def test_every_submit_endpoint_has_a_fast_path_and_nothing_else_does() -> None:
    """Each submit route gets a plan from its own signature; reads and operations do not."""
    routes = [route for route in tasks.router.routes if isinstance(route, FastPathRoute)]
    planned = {route.name for route in routes if fast_plan(route) is not None}
    submits = {route.name for route in routes if route.name.startswith("submit_")}

    assert planned == submits
    assert {"submit_greeting", "submit_tasks"} <= planned
    # A path parameter (and a query): FastAPI's alone, POST or not.
    assert {"task_result", "retry_task"} <= {route.name for route in routes} - planned


async def test_dependency_overrides_are_honoured(settings: Settings, solved: list[str]) -> None:
    """With an override set, FastAPI's handling (which applies it) serves every request."""
    app = create_app(settings)

    async def urgent() -> SubmitOptions:
        return SubmitOptions(priority=9)

    app.dependency_overrides[get_submit_options] = urgent
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api.test") as client,
    ):
        response = await _post(client, "/api/v1/task/greeting", {"name": "Ada"}, FAST)

    assert response.status_code == 202
    assert response.json()["priority"] == 9
    assert solved == ["/api/v1/task/greeting"]
