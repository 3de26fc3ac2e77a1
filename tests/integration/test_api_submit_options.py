"""Submission options: priority, delay_s and run_at as query parameters, strictly checked."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from api.submit_options import MAX_DELAY_S
from throttler.db import SessionFactory
from throttler.models import Task

if TYPE_CHECKING:
    from tests.integration.conftest import RowCounter

GREETING = "/api/v1/task/greeting"
DOWNLOAD = "/api/v1/task/download"
NOTHING_WRITTEN = {"tasks": 0, "outbox": 0, "task_events": 0}


async def _stored(sessions: SessionFactory, task_id: str) -> Task:
    async with sessions() as session:
        task = await session.get(Task, task_id)
    assert task is not None
    return task


async def test_defaults_priority_5_and_no_start_time(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    response = await api_client.post(GREETING, json={"name": "Ada"})

    assert response.status_code == 202
    view = response.json()
    assert (view["priority"], view["run_at"]) == (5, None)
    task = await _stored(sessions, view["task_id"])
    assert (task.priority, task.run_at) == (5, None)


@pytest.mark.parametrize("priority", [0, 7, 9])
async def test_priority_is_stored_and_shown(
    api_client: httpx.AsyncClient, sessions: SessionFactory, priority: int
) -> None:
    response = await api_client.post(
        DOWNLOAD, params={"priority": priority}, json={"url": "https://example.com/"}
    )

    assert response.status_code == 202
    view = response.json()
    assert view["priority"] == priority
    task = await _stored(sessions, view["task_id"])
    assert task.priority == priority
    # The option stays out of the task's own fields.
    assert task.payload == {"url": "https://example.com/"}
    result = await api_client.get(response.headers["location"])
    assert result.json()["priority"] == priority


async def test_delay_s_sets_run_at_that_far_after_submission(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    response = await api_client.post(GREETING, params={"delay_s": 30}, json={"name": "Ada"})

    assert response.status_code == 202
    view = response.json()
    run_at = datetime.fromisoformat(view["run_at"])
    assert run_at - datetime.fromisoformat(view["created_at"]) == timedelta(seconds=30)
    assert run_at.utcoffset() == timedelta(0)
    task = await _stored(sessions, view["task_id"])
    assert task.run_at == run_at
    assert task.payload == {"name": "Ada"}


async def test_delay_s_zero_means_now(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    response = await api_client.post(GREETING, params={"delay_s": 0}, json={"name": "Ada"})

    assert response.status_code == 202
    assert response.json()["run_at"] is None


async def test_run_at_is_stored_in_utc(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    local = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    written = local.astimezone(UTC).replace(tzinfo=None).isoformat() + "+00:00"
    offset = (local + timedelta(hours=1)).replace(tzinfo=None).isoformat() + "+01:00"

    for value in (written, offset):
        # httpx encodes `+` as %2B, as a client must.
        response = await api_client.post(GREETING, params={"run_at": value}, json={"name": "A"})
        assert response.status_code == 202, response.text
        view = response.json()
        assert datetime.fromisoformat(view["run_at"]) == local
        assert view["run_at"].endswith("Z")
        task = await _stored(sessions, view["task_id"])
        assert task.run_at == local


async def test_run_at_in_the_past_means_now(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    response = await api_client.post(
        GREETING, params={"run_at": "2001-01-01T00:00:00Z"}, json={"name": "Ada"}
    )

    assert response.status_code == 202
    view = response.json()
    assert view["run_at"] is None
    assert (await _stored(sessions, view["task_id"])).run_at is None


def _far_future() -> str:
    return (datetime.now(UTC) + timedelta(seconds=MAX_DELAY_S + 3600)).isoformat()


def _soon() -> str:
    """A start time well inside MAX_DELAY_S, so only its spelling can make it invalid."""
    return (datetime.now(UTC) + timedelta(hours=1)).replace(microsecond=0, tzinfo=None).isoformat()


# Spellings of small valid integers that pydantic's lax mode would take: an integer option is
# plain ASCII decimal digits only (no sign, separator, fraction, exponent or whitespace).
LAX_INTEGERS = [
    "5.0",
    "0_5",
    "+5",
    "-0",
    "5e0",
    " 5",
    "5 ",
    "5\n",
    "0x5",
    "\uff15",  # FULLWIDTH DIGIT FIVE
    "\u0665",  # ARABIC-INDIC DIGIT FIVE
]
# run_at is ISO-8601 with a timezone only: never a bare epoch number, never padded.
LAX_TIMES = {
    "epoch": "1700000000",
    "epoch-fraction": "1700000000.5",
    "epoch-soon": str(int(datetime.now(UTC).timestamp()) + 3600),
    "leading-space": f" {_soon()}Z",
    "trailing-space": f"{_soon()}Z ",
    "trailing-newline": f"{_soon()}Z\n",
    "space-before-zone": f"{_soon()} Z",
    "space-for-t": _soon().replace("T", " ") + "Z",
}
# Each option given twice, with a value that is valid once: the repeat alone is the error.
VALID_ONCE = {"priority": "5", "delay_s": "10", "run_at": f"{_soon()}Z"}

# (id, query parameters, the parameter the 422 must name)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("priority-word", {"priority": "high"}, "priority"),
    ("priority-over-9", {"priority": 10}, "priority"),
    ("priority-negative", {"priority": -1}, "priority"),
    ("priority-fraction", {"priority": "1.5"}, "priority"),
    ("priority-empty", {"priority": ""}, "priority"),
    ("delay-negative", {"delay_s": -1}, "delay_s"),
    ("delay-over-max", {"delay_s": MAX_DELAY_S + 1}, "delay_s"),
    ("delay-word", {"delay_s": "soon"}, "delay_s"),
    ("delay-fraction", {"delay_s": "0.5"}, "delay_s"),
    ("delay-underscore", {"delay_s": "1_000"}, "delay_s"),
    ("run-at-naive", {"run_at": "2030-01-01T10:00:00"}, "run_at"),
    ("run-at-garbage", {"run_at": "tomorrow"}, "run_at"),
    ("run-at-too-far", {"run_at": _far_future()}, "run_at"),
    ("delay-and-run-at", {"delay_s": 5, "run_at": "2030-01-01T10:00:00Z"}, "run_at"),
    ("unknown-option", {"delay": 30}, "delay"),
    *[(f"priority-{value!r}", {"priority": value}, "priority") for value in LAX_INTEGERS],
    *[(f"delay-{value!r}", {"delay_s": value}, "delay_s") for value in LAX_INTEGERS],
    *[(f"run-at-{name}", {"run_at": value}, "run_at") for name, value in LAX_TIMES.items()],
    *[(f"{name}-twice", {name: [value, value]}, name) for name, value in VALID_ONCE.items()],
    ("unknown-option-twice", {"delay": [30, 30]}, "delay"),
]


@pytest.mark.parametrize(
    ("params", "field"),
    [case[1:] for case in INVALID],
    ids=[case[0] for case in INVALID],
)
async def test_invalid_option_is_422_naming_it_and_writes_nothing(
    api_client: httpx.AsyncClient, row_counts: RowCounter, params: dict[str, Any], field: str
) -> None:
    response = await api_client.post(GREETING, params=params, json={"name": "Ada"})

    assert response.status_code == 422
    assert ["query", field] in [error["loc"] for error in response.json()["detail"]]
    assert await row_counts() == NOTHING_WRITTEN


async def test_mutually_exclusive_message_names_both(api_client: httpx.AsyncClient) -> None:
    response = await api_client.post(
        GREETING, params={"delay_s": 5, "run_at": "2030-01-01T10:00:00Z"}, json={"name": "A"}
    )

    (error,) = response.json()["detail"]
    assert "delay_s" in error["msg"]
    assert "run_at" in error["msg"]


async def test_options_appear_in_openapi(api_client: httpx.AsyncClient) -> None:
    schema = (await api_client.get("/openapi.json")).json()
    parameters = schema["paths"][GREETING]["post"]["parameters"]

    assert {parameter["name"] for parameter in parameters} >= {"priority", "delay_s", "run_at"}
    view = schema["components"]["schemas"]["TaskPublic"]["properties"]
    assert {"priority", "run_at"} <= set(view)


async def test_repeated_option_message_says_so(api_client: httpx.AsyncClient) -> None:
    response = await api_client.post(GREETING, params={"priority": ["9", "1"]}, json={"name": "A"})

    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["query", "priority"]
    assert "more than once" in error["msg"]


@pytest.mark.parametrize(
    ("params", "priority", "delay_s"),
    [
        ({"priority": "07"}, 7, None),
        ({"delay_s": "0030"}, 5, 30),
        ({"priority": "0", "delay_s": "0"}, 0, None),
    ],
)
async def test_plain_decimal_digits_are_accepted(
    api_client: httpx.AsyncClient, params: dict[str, str], priority: int, delay_s: int | None
) -> None:
    response = await api_client.post(GREETING, params=params, json={"name": "A"})

    assert response.status_code == 202, response.text
    view = response.json()
    assert view["priority"] == priority
    if delay_s is None:
        assert view["run_at"] is None
    else:
        run_at = datetime.fromisoformat(view["run_at"])
        assert run_at - datetime.fromisoformat(view["created_at"]) == timedelta(seconds=delay_s)
