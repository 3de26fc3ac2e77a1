"""The API when the database cannot write: 503 with Retry-After, and /readyz says so.

Each fault is the real one: a PostgreSQL role whose INSERT and UPDATE are revoked (the
services run as a role that owns nothing; a superuser ignores REVOKE), a role whose
sessions are read-only, a SQLite file another connection holds locked, and, where the
test may mount a file system, a SQLite file on a full or read-only tmpfs.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from devtools.postgres_role import AppRole, create_app_role
from tests.support import wait_for
from throttler.settings import Settings, sqlite_path

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

SINGLE = "/api/v1/task/greeting"
BULK = "/api/v1/tasks"
ON_SQLITE = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


@pytest.fixture
async def app_role(database_url: str) -> AsyncIterator[AppRole]:
    role = await create_app_role(database_url)
    try:
        yield role
    finally:
        await role.drop()


def as_role(settings: Settings, role: AppRole) -> Settings:
    return settings.model_copy(update={"database_url": role.url, "database_timeout_s": 1.0})


async def submissions(client: httpx.AsyncClient, count: int) -> list[httpx.Response]:
    """``count`` single submissions and one bulk submission of three."""
    answers = [await client.post(SINGLE, json={"name": f"n{index}"}) for index in range(count)]
    bulk = {"tasks": [{"name": "greeting", "input": {"name": f"b{i}"}} for i in range(3)]}
    answers.append(await client.post(BULK, json=bulk))
    return answers


def assert_unavailable(answers: list[httpx.Response]) -> None:
    assert [answer.status_code for answer in answers] == [503] * len(answers)
    for answer in answers:
        assert int(answer.headers["retry-after"]) > 0
        assert answer.json() == {"detail": "database unavailable, retry later"}


async def readiness(client: httpx.AsyncClient) -> tuple[int, dict[str, Any]]:
    answer = await client.get("/readyz")
    return answer.status_code, answer.json()


async def wait_ready(client: httpx.AsyncClient, expected: int) -> dict[str, Any]:
    """/readyz's body once it answers ``expected`` (its result is cached a moment)."""

    async def probe() -> dict[str, Any] | None:
        code, body = await readiness(client)
        return body if code == expected else None

    body = await wait_for(probe, timeout_s=15, message=f"/readyz to answer {expected}")
    assert body is not None
    return body


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
async def test_revoked_writes_answer_503_and_make_the_api_unready(
    settings: Settings, app_role: AppRole, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(as_role(settings, app_role)) as client:
        before = await client.post(SINGLE, json={"name": "before"})
        assert before.status_code == 202
        assert await readiness(client) == (200, {"status": "ok", "database": "ok", "redis": "ok"})

        await app_role.revoke_writes()
        refused = await submissions(client, 5)
        # Reads need SELECT only: still answered.
        view = await client.get(before.headers["location"])
        waited = await client.get(before.headers["location"], params={"wait": 0.1})
        unready = await wait_ready(client, 503)

        await app_role.grant_writes()
        await wait_ready(client, 200)
        after = await client.post(SINGLE, json={"name": "after"})

    assert_unavailable(refused)
    assert (view.status_code, waited.status_code) == (200, 200)
    assert unready["database"] == "unavailable"
    assert "INSERT on tasks" in unready["reason"]
    assert after.status_code == 202


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
async def test_revoked_reads_answer_503(
    settings: Settings, app_role: AppRole, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(as_role(settings, app_role)) as client:
        before = await client.post(SINGLE, json={"name": "before"})
        await app_role.execute(
            f'REVOKE SELECT ON ALL TABLES IN SCHEMA public FROM "{app_role.name}"'
        )
        view = await client.get(before.headers["location"])
        waited = await client.get(before.headers["location"], params={"wait": 0.1})

    assert_unavailable([view, waited])


@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
@pytest.mark.postgres
async def test_read_only_database_answers_503_and_makes_the_api_unready(
    settings: Settings, app_role: AppRole, make_api_client: ApiClientFactory
) -> None:
    async with make_api_client(as_role(settings, app_role)) as client:
        assert (await client.post(SINGLE, json={"name": "before"})).status_code == 202
        await app_role.set_read_only(True)
        refused = await submissions(client, 3)
        unready = await wait_ready(client, 503)

        await app_role.set_read_only(False)
        await wait_ready(client, 200)
        after = await client.post(SINGLE, json={"name": "after"})

    assert_unavailable(refused)
    assert "read-only" in unready["reason"]
    assert after.status_code == 202


@contextmanager
def exclusive_lock(database_url: str) -> Iterator[None]:
    """Another process's connection holding SQLite's write lock (and its readers off)."""
    path = sqlite_path(database_url)
    assert path is not None
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        yield
        holder.execute("ROLLBACK")
    finally:
        holder.close()


@ON_SQLITE
async def test_locked_sqlite_answers_503_and_makes_the_api_unready(
    settings: Settings, make_api_client: ApiClientFactory
) -> None:
    settings = settings.model_copy(update={"database_timeout_s": 0.2})
    async with make_api_client(settings) as client:
        assert await readiness(client) == (200, {"status": "ok", "database": "ok", "redis": "ok"})
        with exclusive_lock(settings.database_url):
            refused = await submissions(client, 3)
            unready = await wait_ready(client, 503)
        await wait_ready(client, 200)
        after = await client.post(SINGLE, json={"name": "after"})

    assert_unavailable(refused)
    assert "locked" in unready["reason"]
    assert after.status_code == 202


@contextmanager
def tmpfs(directory: Path, *, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``directory``; skips the test where mount is refused."""
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def fill(directory: Path) -> None:
    """Write a file until the file system has no room left."""
    descriptor = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        for size in (1 << 16, 1 << 12, 1):  # big chunks, then the last bytes
            with contextlib.suppress(OSError):
                while True:
                    os.write(descriptor, b"\0" * size)
    finally:
        os.close(descriptor)


@ON_SQLITE
async def test_sqlite_on_a_full_disk_answers_503_and_makes_the_api_unready(
    settings: Settings, make_api_client: ApiClientFactory, tmp_path: Path
) -> None:
    source = sqlite_path(settings.database_url)
    assert source is not None
    with tmpfs(tmp_path / "mnt", size="8m") as mount:
        database = mount / "full.db"
        database.write_bytes(source.read_bytes())
        on_tmpfs = settings.model_copy(
            update={"database_url": f"sqlite+aiosqlite:///{database}", "database_timeout_s": 0.2}
        )
        async with make_api_client(on_tmpfs) as client:
            assert (await readiness(client))[0] == 200
            fill(mount)
            unready = await wait_ready(client, 503)
            # Bulks large enough that the WAL must grow: the writes cannot fit.
            bulk = {"tasks": [{"name": "greeting", "input": {"name": "x" * 200}}] * 500}
            answers = [await client.post(BULK, json=bulk) for _ in range(5)]
            (mount / "filler").unlink()
            await wait_ready(client, 200)
            after = await client.post(SINGLE, json={"name": "after"})

    assert "disk full" in unready["reason"]
    codes = [answer.status_code for answer in answers]
    assert 500 not in codes, codes
    assert 503 in codes, codes
    assert_unavailable([answer for answer in answers if answer.status_code == 503])
    assert after.status_code == 202


@ON_SQLITE
async def test_sqlite_on_a_read_only_file_system_answers_503_and_makes_the_api_unready(
    settings: Settings, make_api_client: ApiClientFactory, tmp_path: Path
) -> None:
    source = sqlite_path(settings.database_url)
    assert source is not None
    with tmpfs(tmp_path / "mnt", size="16m") as mount:
        database = mount / "ro.db"
        database.write_bytes(source.read_bytes())
        on_tmpfs = settings.model_copy(
            update={"database_url": f"sqlite+aiosqlite:///{database}", "database_timeout_s": 0.2}
        )
        # Read-only before the API opens it: a file system with files open for writing
        # cannot be remounted read-only.
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        try:
            async with make_api_client(on_tmpfs) as client:
                refused = await submissions(client, 3)
                unready = await wait_ready(client, 503)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(mount)], check=True)

    assert_unavailable(refused)
    assert "read-only" in unready["reason"]
