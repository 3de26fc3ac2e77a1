"""Admin keys (API_ADMIN_KEYS): read any account's tasks with ``?account=``, on both databases.

An admin key is one of API_KEYS with its own account: without ``account=`` it reads that
account, like any key. Another key passing ``account=`` gets 403, an unknown key 401;
a bad ``account`` is a 422 naming it. Without API_KEYS everything is open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from api.admin import AdminDep
from api.app import create_app
from throttler.constants import DEFAULT_ACCOUNT
from throttler.models import ACCOUNT_LENGTH
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

GREETING = "/api/v1/task/greeting"
TASKS = "/api/v1/tasks"
KEY_A = "key-a-0123456789"
KEY_B = "key-b-0123456789"
KEY_ADMIN = "key-admin-0123456789"
# The three single-task reads an admin may point at another account.
READS = ["/api/v1/tasks/{id}", "/api/v1/tasks/{id}/events", "/api/v1/task/result/{id}"]


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def client(
    settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    keyed = Settings(
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        api_keys=f"{KEY_A}:account-a,{KEY_B}:account-b,{KEY_ADMIN}:ops",
        api_admin_keys=KEY_ADMIN,
    )
    async with make_api_client(keyed) as client:
        yield client


async def _submit(client: httpx.AsyncClient, key: str, name: str) -> dict[str, Any]:
    answer = await client.post(GREETING, json={"name": name}, headers=_bearer(key))
    assert answer.status_code == 202, answer.text
    view: dict[str, Any] = answer.json()
    return view


async def _ids(
    client: httpx.AsyncClient, key: str, params: dict[str, Any] | None = None
) -> list[str]:
    answer = await client.get(TASKS, params=params, headers=_bearer(key))
    assert answer.status_code == 200, answer.text
    return [task["task_id"] for task in answer.json()["tasks"]]


async def test_an_admin_lists_another_accounts_tasks_and_pages_through_them(
    client: httpx.AsyncClient,
) -> None:
    own = [(await _submit(client, KEY_A, f"a{n}"))["task_id"] for n in range(5)]
    theirs = (await _submit(client, KEY_B, "b"))["task_id"]
    mine = (await _submit(client, KEY_ADMIN, "ops"))["task_id"]

    assert await _ids(client, KEY_ADMIN, {"account": "account-a"}) == own[::-1]
    assert await _ids(client, KEY_ADMIN, {"account": "account-b"}) == [theirs]
    assert await _ids(client, KEY_ADMIN, {"account": "nobody"}) == []
    # Without account=, an admin key reads its own account, like any key.
    assert await _ids(client, KEY_ADMIN) == [mine]
    # Filters and the cursor work with account= as without it.
    params: dict[str, Any] = {"account": "account-a", "status": "pending", "limit": 2}
    paged: list[str] = []
    while True:
        answer = await client.get(TASKS, params=params, headers=_bearer(KEY_ADMIN))
        assert answer.status_code == 200, answer.text
        paged += [task["task_id"] for task in answer.json()["tasks"]]
        if answer.json()["next_cursor"] is None:
            break
        params["cursor"] = answer.json()["next_cursor"]
    assert paged == own[::-1]


@pytest.mark.parametrize("path", READS)
async def test_an_admin_reads_another_accounts_task_with_account(
    client: httpx.AsyncClient, path: str
) -> None:
    task = await _submit(client, KEY_A, "Ada")
    url = path.format(id=task["task_id"])

    as_owner = await client.get(url, headers=_bearer(KEY_A))
    as_admin = await client.get(url, params={"account": "account-a"}, headers=_bearer(KEY_ADMIN))

    assert as_owner.status_code == 200, as_owner.text
    assert as_admin.status_code == 200, as_admin.text
    assert as_admin.json() == as_owner.json()
    # Without account= (its own account), or naming the wrong account: 404, as for anyone.
    assert (await client.get(url, headers=_bearer(KEY_ADMIN))).status_code == 404
    wrong = await client.get(url, params={"account": "account-b"}, headers=_bearer(KEY_ADMIN))
    assert wrong.status_code == 404


@pytest.mark.parametrize("path", [TASKS, *READS])
async def test_account_without_an_admin_key_is_403(client: httpx.AsyncClient, path: str) -> None:
    task = await _submit(client, KEY_B, "Bob")
    url = path.format(id=task["task_id"])

    for account in ("account-a", "account-b", ""):  # another's, its own, even an invalid one
        answer = await client.get(url, params={"account": account}, headers=_bearer(KEY_B))
        assert answer.status_code == 403, (account, answer.text)
        assert "admin" in answer.json()["detail"]
    # The same request without account= is the caller's own read.
    assert (await client.get(url, headers=_bearer(KEY_B))).status_code == 200


@pytest.mark.parametrize("path", [TASKS, *READS])
@pytest.mark.parametrize("headers", [{}, _bearer("wrong-key"), _bearer(KEY_ADMIN + "x")])
async def test_an_unknown_key_is_401_with_or_without_account(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    url = path.format(id="00000000-0000-4000-8000-000000000000")
    for params in ({}, {"account": "account-a"}):
        answer = await client.get(url, params=params, headers=headers)
        assert answer.status_code == 401, answer.text
        assert answer.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "query",
    [
        "account=",
        "account=" + "x" * (ACCOUNT_LENGTH + 1),
        "account=a%00b",
        "account=a%0Ab",
        "account=account-a&account=account-b",
    ],
    ids=["empty", "oversized", "nul", "newline", "repeated"],
)
@pytest.mark.parametrize("path", [TASKS, *READS])
async def test_a_bad_account_is_a_422_naming_it(
    client: httpx.AsyncClient, path: str, query: str
) -> None:
    url = path.format(id="00000000-0000-4000-8000-000000000000")

    answer = await client.get(f"{url}?{query}", headers=_bearer(KEY_ADMIN))

    assert answer.status_code == 422, answer.text
    assert [error["loc"] for error in answer.json()["detail"]] == [["query", "account"]]


async def test_an_account_of_the_longest_length_is_taken(client: httpx.AsyncClient) -> None:
    longest = "x" * ACCOUNT_LENGTH
    assert await _ids(client, KEY_ADMIN, {"account": longest}) == []


async def test_without_api_keys_every_caller_may_pass_account(
    api_client: httpx.AsyncClient,
) -> None:
    submitted = await api_client.post(GREETING, json={"name": "Ada"})
    assert submitted.status_code == 202, submitted.text
    task_id = submitted.json()["task_id"]

    listed = await api_client.get(TASKS, params={"account": DEFAULT_ACCOUNT})
    elsewhere = await api_client.get(TASKS, params={"account": "other"})
    read = await api_client.get(f"{TASKS}/{task_id}", params={"account": DEFAULT_ACCOUNT})

    assert [task["task_id"] for task in listed.json()["tasks"]] == [task_id]
    assert elsewhere.json()["tasks"] == []
    assert read.status_code == 200, read.text


async def test_admin_dep_guards_an_admin_only_call(settings: Settings) -> None:
    """AdminDep (for limit changes and pauses): 401 unknown key, 403 other keys, else the
    caller; open without API_KEYS. Tried on the real app with one route added."""

    async def admin_only(caller: AdminDep) -> dict[str, str]:
        return {"account": caller.account}

    def app_of(keys: str, admin_keys: str) -> Any:
        app = create_app(
            Settings(
                database_url=settings.database_url,
                redis_url=settings.redis_url,
                api_keys=keys,
                api_admin_keys=admin_keys,
            )
        )
        app.add_api_route("/api/v1/admin-only", admin_only, methods=["GET"])
        return app

    keyed = app_of(f"{KEY_A}:account-a,{KEY_ADMIN}:ops", KEY_ADMIN)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=keyed), base_url="http://api.test"
    ) as client:
        url = "/api/v1/admin-only"
        assert (await client.get(url)).status_code == 401
        assert (await client.get(url, headers=_bearer("wrong"))).status_code == 401
        assert (await client.get(url, headers=_bearer(KEY_A))).status_code == 403
        admin = await client.get(url, headers=_bearer(KEY_ADMIN))
        assert (admin.status_code, admin.json()) == (200, {"account": "ops"})
    open_app = app_of("", "")
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=open_app), base_url="http://api.test"
    ) as client:
        answer = await client.get("/api/v1/admin-only")
        assert (answer.status_code, answer.json()) == (200, {"account": DEFAULT_ACCOUNT})
