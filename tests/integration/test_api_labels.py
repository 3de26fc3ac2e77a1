"""Labels (``key``): chosen at submission, shown in the view, listed and retried by.

On SQLite and PostgreSQL, through the API: a single submit's repeated ``key`` query
parameter (on the fast path too) and a bulk item's ``keys``; the view's ``keys``; the
``task_labels`` rows (none without labels); ``GET /tasks?key=`` with the other filters
and keyset pages; ``POST /tasks/retry`` and ``POST /tasks/cancel`` with ``key``; a bad
label is a 422 naming its field, and writes nothing; labels are part of an idempotent
request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import fastapi.routing
import httpx
import pytest
from fastapi.dependencies.utils import solve_dependencies
from sqlalchemy import delete, func, select, text, update

from throttler.db import SessionFactory
from throttler.models import OutboxEntry, Task, TaskEvent, TaskLabel
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

API = "/api/v1"
GREETING = f"{API}/task/greeting"
TASKS = f"{API}/tasks"
FAST = {"content-type": "application/json"}
STANDARD = {"content-type": "application/vnd.test+json"}  # FastAPI's own path

Counter = Callable[[], Awaitable[dict[str, int]]]


@pytest.fixture
def counts(sessions: SessionFactory) -> Counter:
    async def count() -> dict[str, int]:
        async with sessions() as session:
            return {
                model.__tablename__: int(
                    await session.scalar(select(func.count()).select_from(model)) or 0
                )
                for model in (Task, TaskLabel, OutboxEntry, TaskEvent)
            }

    return count


@pytest.fixture
def solved(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The path of every request FastAPI's own handling served (as test_api_fast_path)."""
    paths: list[str] = []
    solve = solve_dependencies

    async def counting(**kwargs: Any) -> Any:
        paths.append(kwargs["request"].url.path)
        return await solve(**kwargs)

    monkeypatch.setattr(fastapi.routing, "solve_dependencies", counting)
    return paths


async def _label_rows(sessions: SessionFactory) -> list[tuple[str, str, str, Any]]:
    async with sessions() as session:
        rows = await session.execute(
            select(TaskLabel.task_id, TaskLabel.label, TaskLabel.account, TaskLabel.created_at)
        )
        return sorted((row.task_id, row.label, row.account, row.created_at) for row in rows)


async def _submit(client: httpx.AsyncClient, *labels: str, **kw: Any) -> dict[str, Any]:
    response = await client.post(
        GREETING, params=[("key", label) for label in labels], json={"name": "Ada"}, **kw
    )
    assert response.status_code == 202, response.text
    view: dict[str, Any] = response.json()
    return view


async def _bulk(client: httpx.AsyncClient, items: list[dict[str, Any]], **kw: Any) -> list[str]:
    response = await client.post(TASKS, json={"tasks": items}, **kw)
    assert response.status_code == 202, response.text
    return [task["task_id"] for task in response.json()["tasks"]]


def _item(*labels: str, name: str = "greeting") -> dict[str, Any]:
    task_input = {"name": "Ada"} if name == "greeting" else {"duration": 0}
    item: dict[str, Any] = {"name": name, "input": task_input}
    if labels:
        item["keys"] = list(labels)
    return item


async def _pages(client: httpx.AsyncClient, **params: Any) -> list[str]:
    """Every page of the list, newest first, following next_cursor."""
    ids: list[str] = []
    cursor = None
    while True:
        response = await client.get(
            TASKS, params={**params, **({"cursor": cursor} if cursor else {})}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        assert len(page["tasks"]) <= int(params.get("limit", 100))
        ids += [task["task_id"] for task in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


async def test_a_single_submit_carries_its_labels_sorted_into_view_and_rows(
    api_client: httpx.AsyncClient, sessions: SessionFactory, solved: list[str]
) -> None:
    view = await _submit(api_client, "tenant:acme", "connector:salesforce")
    assert solved == []  # labels alone stay on the fast path

    labels = ["connector:salesforce", "tenant:acme"]
    assert view["keys"] == labels
    for path in (f"{TASKS}/{view['task_id']}", f"{API}/task/result/{view['task_id']}"):
        # Read back with no relay running, the view says so.
        no_relay = {"reason": "no_relay", "scope": None, "until": None}
        assert (await api_client.get(path)).json() == view | {"waiting": no_relay}
    async with sessions() as session:
        task = await session.get(Task, view["task_id"])
    assert task is not None
    assert task.labels == labels
    assert await _label_rows(sessions) == [
        (view["task_id"], label, "default", task.created_at) for label in labels
    ]


async def test_the_fast_path_and_fastapi_answer_labels_alike(
    api_client: httpx.AsyncClient, solved: list[str]
) -> None:
    query = "?key=b:2&key=a:1"
    fast = await api_client.post(GREETING + query, json={"name": "Ada"}, headers=FAST)
    assert solved == []
    standard = await api_client.post(GREETING + query, content=b'{"name": "Ada"}', headers=STANDARD)
    assert solved == [GREETING]

    assert fast.status_code == standard.status_code == 202
    per_task = ("task_id", "created_at")
    assert {k: v for k, v in fast.json().items() if k not in per_task} == {
        k: v for k, v in standard.json().items() if k not in per_task
    }
    assert fast.json()["keys"] == ["a:1", "b:2"]


async def test_other_options_beside_labels_go_to_fastapi(
    api_client: httpx.AsyncClient, solved: list[str]
) -> None:
    response = await api_client.post(
        GREETING, params={"key": "a:1", "priority": "7"}, json={"name": "Ada"}
    )
    assert response.status_code == 202, response.text
    assert solved == [GREETING]
    assert response.json()["keys"] == ["a:1"]
    assert response.json()["priority"] == 7


async def test_without_labels_nothing_is_written_for_them(
    api_client: httpx.AsyncClient, sessions: SessionFactory, counts: Counter
) -> None:
    single = await _submit(api_client)
    bulk = await _bulk(api_client, [_item(), _item()])

    assert single["keys"] == []
    assert (await counts())["task_labels"] == 0
    async with sessions() as session:
        # SQL NULL, not a JSON null or an empty array.
        nulls = await session.scalar(text("SELECT count(*) FROM tasks WHERE labels IS NULL"))
    assert nulls == 1 + len(bulk)


async def test_a_bulk_submission_carries_each_items_labels(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    ids = await _bulk(
        api_client,
        [
            _item("tenant:a", "connector:x"),
            _item(),
            _item("tenant:b"),
            _item("a:1", "b:2", "c:3", "d:4"),
        ],
    )
    views = [(await api_client.get(f"{TASKS}/{task_id}")).json() for task_id in ids]

    assert [view["keys"] for view in views] == [
        ["connector:x", "tenant:a"],
        [],
        ["tenant:b"],
        ["a:1", "b:2", "c:3", "d:4"],
    ]
    rows = await _label_rows(sessions)
    assert sorted((task_id, label) for task_id, label, *_ in rows) == sorted(
        (view["task_id"], label) for view in views for label in view["keys"]
    )


async def test_the_list_filters_by_label_newest_first_a_page_at_a_time(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    # Single and bulk submissions, with the label, with another, with none.
    tenant_a = [(await _submit(api_client, "tenant:a"))["task_id"] for _ in range(3)]
    mixed = await _bulk(
        api_client,
        [_item("tenant:a"), _item("tenant:b"), _item(), _item("tenant:a", "x:y")] * 3,
    )
    tenant_a += [task_id for index, task_id in enumerate(mixed) if index % 4 in (0, 3)]
    tenant_a += [(await _submit(api_client, "tenant:a", "z:z"))["task_id"] for _ in range(2)]
    async with sessions() as session:
        rows = (await session.execute(select(Task.created_at, Task.id))).all()
    newest_first = [row.id for row in sorted(rows, reverse=True)]
    expected = [task_id for task_id in newest_first if task_id in set(tenant_a)]

    assert await _pages(api_client, key="tenant:a", limit=2) == expected
    assert await _pages(api_client, key="tenant:a", limit=1000) == expected
    assert await _pages(api_client, key="tenant:b", limit=2) == [
        task_id for task_id in newest_first if task_id in set(mixed[1::4])
    ]
    assert await _pages(api_client, key="tenant:none") == []

    # With the other filters: status, name, creation time.
    failed = expected[1::2]
    async with sessions() as session, session.begin():
        await session.execute(update(Task).where(Task.id.in_(failed)).values(status="failed"))
    assert await _pages(api_client, key="tenant:a", status="failed", limit=2) == failed
    assert (
        await _pages(
            api_client, key="tenant:a", status=["failed", "pending"], name="greeting", limit=3
        )
        == expected
    )
    assert await _pages(api_client, key="tenant:a", name="download") == []
    created = {row.id: row.created_at for row in rows}
    cut = created[expected[4]]
    before = [task_id for task_id in expected if created[task_id] < cut]
    assert before  # the first three single submits, at least
    assert await _pages(api_client, key="tenant:a", created_before=cut.isoformat(), limit=2) == (
        before
    )


async def test_the_list_by_label_is_the_callers_own(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    keyed = Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        api_keys="key-a-0123456789:account-a,key-b-0123456789:account-b",
    )
    a = {"Authorization": "Bearer key-a-0123456789"}
    b = {"Authorization": "Bearer key-b-0123456789"}
    async with make_api_client(keyed) as client:
        mine = (await _submit(client, "tenant:x", headers=a))["task_id"]
        await _submit(client, "tenant:x", headers=b)
        response = await client.get(TASKS, params={"key": "tenant:x"}, headers=a)

    assert [task["task_id"] for task in response.json()["tasks"]] == [mine]


async def test_retry_by_label_takes_only_that_labels_failed_tasks(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    ids = await _bulk(api_client, [_item("connector:x"), _item("connector:y"), _item()] * 2)
    labelled = ids[0::3]
    async with sessions() as session, session.begin():
        await session.execute(update(Task).values(status="failed", attempts=1))
        await session.execute(delete(OutboxEntry))

    response = await api_client.post(f"{TASKS}/retry", json={"key": "connector:x"})

    assert response.json() == {"count": 2, "remaining": 0}
    async with sessions() as session:
        statuses = dict((await session.execute(select(Task.id, Task.status))).all())
    assert {task_id for task_id, status in statuses.items() if status == "pending"} == set(labelled)
    again = await api_client.post(f"{TASKS}/retry", json={"key": "connector:x"})
    assert again.json() == {"count": 0, "remaining": 0}


async def test_cancel_by_label_takes_only_that_labels_tasks(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    ids = await _bulk(api_client, [_item("connector:x"), _item("connector:y"), _item()] * 2)
    labelled = ids[0::3]

    response = await api_client.post(f"{TASKS}/cancel", json={"key": "connector:x"})

    assert response.json()["count"] == 2
    assert response.json()["remaining"] == 0
    async with sessions() as session:
        statuses = dict((await session.execute(select(Task.id, Task.status))).all())
    cancelled = {task_id for task_id, status in statuses.items() if status == "cancelled"}
    assert cancelled == set(labelled)


# (id, query, the parameter the 422 must name)
BAD_QUERIES = [
    ("uppercase-prefix", "key=Tenant:a", "key"),
    ("no-colon", "key=tenant", "key"),
    ("no-value", "key=tenant:", "key"),
    ("no-prefix", "key=:a", "key"),
    ("space", "key=tenant:a%20b", "key"),
    ("plus-is-space", "key=tenant:a+b", "key"),
    ("wildcard", "key=tenant:*", "key"),
    ("slash", "key=tenant:a/b", "key"),
    ("empty", "key=", "key"),
    ("bare", "key", "key"),
    ("non-ascii", "key=tenant:%C3%A9", "key"),
    ("too-long", "key=tenant:" + "v" * 129, "key"),
    ("twice", "key=tenant:a&key=tenant:a", "key"),
    ("five", "&".join(f"key=k:{i}" for i in range(5)), "key"),
    ("plural", "keys=tenant:a", "keys"),
    ("capitalised", "Key=tenant:a", "Key"),
    ("one-bad-of-two", "key=tenant:a&key=x", "key"),
]


@pytest.mark.parametrize(
    ("query", "field"), [case[1:] for case in BAD_QUERIES], ids=[case[0] for case in BAD_QUERIES]
)
async def test_a_bad_label_on_a_submit_is_422_naming_it_and_writes_nothing(
    api_client: httpx.AsyncClient, counts: Counter, query: str, field: str
) -> None:
    for headers in (FAST, STANDARD):
        response = await api_client.post(
            f"{GREETING}?{query}", content=b'{"name": "Ada"}', headers=headers
        )
        assert response.status_code == 422, response.text
        assert ["query", field] in [error["loc"] for error in response.json()["detail"]]
    assert set((await counts()).values()) == {0}


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("key=Tenant:a", "key"),
        ("key=tenant", "key"),
        ("key=tenant:a&key=tenant:b", "key"),  # one label a page: not an AND, not an OR
        ("keys=tenant:a", "keys"),
    ],
)
async def test_a_bad_label_filter_is_422_naming_it(
    api_client: httpx.AsyncClient, query: str, field: str
) -> None:
    response = await api_client.get(f"{TASKS}?{query}")

    assert response.status_code == 422, response.text
    assert ["query", field] in [error["loc"] for error in response.json()["detail"]]


@pytest.mark.parametrize(
    ("item", "loc"),
    [
        ({"keys": ["tenant"]}, ["keys", 0]),
        ({"keys": ["ok:1", "Bad:1"]}, ["keys", 1]),
        ({"keys": [5]}, ["keys", 0]),
        ({"keys": "tenant:a"}, ["keys"]),
        ({"keys": ["a:1", "a:1"]}, ["keys"]),
        ({"keys": [f"k:{i}" for i in range(5)]}, ["keys"]),
        ({"key": ["tenant:a"]}, ["key"]),
    ],
)
async def test_a_bad_label_in_a_bulk_item_is_422_naming_the_item(
    api_client: httpx.AsyncClient, counts: Counter, item: dict[str, Any], loc: list[Any]
) -> None:
    body = {"tasks": [_item("tenant:a"), {**_item(), **item}]}
    response = await api_client.post(TASKS, json=body)

    assert response.status_code == 422, response.text
    assert ["body", "tasks", 1, *loc] in [error["loc"] for error in response.json()["detail"]]
    assert set((await counts()).values()) == {0}


async def test_labels_are_part_of_an_idempotent_request(
    api_client: httpx.AsyncClient, counts: Counter
) -> None:
    first = await _submit(api_client, "a:1", "b:2", headers={"Idempotency-Key": "k1"})

    # The same labels in another order, or as a bulk item: the same request, a replay.
    again = await api_client.post(
        f"{GREETING}?key=b:2&key=a:1", json={"name": "Ada"}, headers={"Idempotency-Key": "k1"}
    )
    assert again.status_code == 200
    assert again.json() == first
    bulk = await api_client.post(
        TASKS, json={"tasks": [{**_item("b:2", "a:1"), "idempotency_key": "k1"}]}
    )
    assert bulk.status_code == 200
    assert bulk.json()["tasks"] == [first]
    # Other labels, or none: another request under the same key.
    for query in ("?key=a:1", "", "?key=a:1&key=b:3"):
        other = await api_client.post(
            GREETING + query, json={"name": "Ada"}, headers={"Idempotency-Key": "k1"}
        )
        assert other.status_code == 422, query
    assert (await counts())["task_labels"] == 2
    # A replayed labelled bulk item writes no label rows either.
    assert await counts() == {"tasks": 1, "task_labels": 2, "outbox": 1, "task_events": 1}
