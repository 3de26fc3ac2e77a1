"""Group commit: concurrent submissions share transactions, and a 202 still means committed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from api.intake import IntakeClosedError, IntakeWriter
from throttler.db import SessionFactory, connect_sqlite
from throttler.models import OutboxEntry, TaskEvent
from throttler.settings import Settings, sqlite_path
from throttler.statuses import EventKind
from throttler.store import open_store
from throttler.store.intake import CoreIntake
from throttler.store.sqlite_intake import SQLiteIntake
from throttler.submit import NewTask

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory, RowCounter

GREETING = "/api/v1/task/greeting"
CONCURRENT = 200


def _new_task(name: str, *, task_id: str | None = None) -> NewTask:
    task = NewTask(
        name="greeting",
        account="default",
        payload={"name": name},
        created_at=datetime.now(UTC),
    )
    if task_id is None:
        return task
    return NewTask(
        name=task.name,
        account=task.account,
        payload=task.payload,
        created_at=task.created_at,
        task_id=task_id,
    )


async def test_concurrent_submissions_are_all_committed(
    api_client: httpx.AsyncClient, sessions: SessionFactory, row_counts: RowCounter
) -> None:
    responses = await asyncio.gather(
        *(api_client.post(GREETING, json={"name": f"n{i}"}) for i in range(CONCURRENT))
    )

    assert [response.status_code for response in responses] == [202] * CONCURRENT
    task_ids = {response.json()["task_id"] for response in responses}
    assert len(task_ids) == CONCURRENT
    assert await row_counts() == {
        "tasks": CONCURRENT,
        "outbox": CONCURRENT,
        "task_events": CONCURRENT,
    }
    async with sessions() as session:
        outboxed = set(await session.scalars(select(OutboxEntry.task_id)))
        submitted = set(
            await session.scalars(
                select(TaskEvent.task_id).where(TaskEvent.event == EventKind.SUBMITTED)
            )
        )
    assert outboxed == submitted == task_ids


class _Gate:
    """Holds the writer thread's first COMMIT until the test has queued the rest.

    The thread's transaction takes whatever is waiting as it begins. Behind the gate it
    has taken the first submission alone and waits to commit it; submissions queued then
    form its next batch once the gate opens.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._reached = threading.Event()
        self._open = threading.Event()

    def connect(self) -> sqlite3.Connection:
        connection = connect_sqlite(self._settings)
        connection.set_trace_callback(self._on_statement)
        return connection

    def _on_statement(self, statement: str) -> None:
        # On the writer thread, as it runs each statement.
        if statement == "COMMIT" and not self._reached.is_set():
            self._reached.set()
            self._open.wait()

    async def reached(self) -> None:
        await asyncio.to_thread(self._reached.wait)

    def open(self) -> None:
        self._open.set()


@pytest.mark.parametrize("kind", ["thread", "session"])
async def test_failed_batch_fails_every_submission_in_it_and_writes_nothing(
    kind: str, settings: Settings, engine: AsyncEngine, row_counts: RowCounter
) -> None:
    gate = _Gate(settings)
    writer: IntakeWriter
    if kind == "thread":
        if not settings.is_sqlite:
            pytest.skip("the thread writer is SQLite's")
        writer = IntakeWriter(SQLiteIntake(settings, engine, connect=gate.connect))
    else:
        writer = IntakeWriter(CoreIntake(engine))
    writer.start()
    try:
        existing = _new_task("first")
        first = asyncio.ensure_future(writer.submit([existing]))
        if kind == "thread":
            await gate.reached()
        else:
            await first  # then the loop queues all of the gathered ones before it looks
        # Queued together, so written together: the duplicate id sinks the whole batch.
        together = asyncio.gather(
            writer.submit([_new_task("innocent")]),
            writer.submit([_new_task("clash", task_id=existing.task_id)]),
            writer.submit([_new_task("bystander-1"), _new_task("bystander-2")]),
            return_exceptions=True,
        )
        await asyncio.sleep(0)  # each reaches the queue
        gate.open()
        await first
        outcomes = await together
        assert all(isinstance(outcome, IntegrityError) for outcome in outcomes), outcomes
        # The writer carries on with the next batch.
        await writer.submit([_new_task("after")])
    finally:
        gate.open()
        await writer.close()

    assert await row_counts() == {"tasks": 2, "outbox": 2, "task_events": 2}


async def test_close_writes_what_is_queued_then_refuses(
    settings: Settings, engine: AsyncEngine, row_counts: RowCounter
) -> None:
    writer = IntakeWriter(open_store(settings, engine).intake)
    writer.start()
    pending = [asyncio.ensure_future(writer.submit([_new_task(f"n{i}")])) for i in range(5)]
    await asyncio.sleep(0)  # let each submission reach the queue
    await writer.close()

    await asyncio.gather(*pending)
    with pytest.raises(IntakeClosedError):
        await writer.submit([_new_task("late")])
    assert await row_counts() == {"tasks": 5, "outbox": 5, "task_events": 5}


async def test_locked_database_answers_503_to_every_request_of_the_batch(
    settings: Settings, make_api_client: ApiClientFactory, row_counts: RowCounter
) -> None:
    path = sqlite_path(settings.database_url)
    if path is None:
        pytest.skip("SQLite write lock; the PostgreSQL lock test is in test_api_unavailable")
    impatient = Settings(
        database_url=settings.database_url, redis_url=settings.redis_url, database_timeout_s=0.3
    )
    async with make_api_client(impatient) as client:
        assert (await client.post(GREETING, json={"name": "first"})).status_code == 202
        locker = sqlite3.connect(path, isolation_level=None)
        try:
            locker.execute("BEGIN IMMEDIATE")
            responses = await asyncio.gather(
                *(client.post(GREETING, json={"name": f"n{i}"}) for i in range(20)),
                client.post(
                    "/api/v1/tasks", json={"tasks": [{"name": "greeting", "input": {"name": "b"}}]}
                ),
            )
        finally:
            locker.rollback()
            locker.close()
        assert (await client.post(GREETING, json={"name": "after"})).status_code == 202

    assert {response.status_code for response in responses} == {503}
    assert all(int(response.headers["retry-after"]) > 0 for response in responses)
    assert await row_counts() == {"tasks": 2, "outbox": 2, "task_events": 2}


async def test_intake_counts_match_on_both_databases(
    api_client: httpx.AsyncClient, sessions: SessionFactory
) -> None:
    bulk = {"tasks": [{"name": "greeting", "input": {"name": f"b{i}"}} for i in range(50)]}
    responses = await asyncio.gather(
        api_client.post("/api/v1/tasks", json=bulk),
        *(api_client.post(GREETING, json={"name": f"s{i}"}) for i in range(50)),
        api_client.post("/api/v1/tasks", json=bulk),
    )

    assert [response.status_code for response in responses] == [202] * 52
    async with sessions() as session:
        events = await session.scalar(select(func.count()).select_from(TaskEvent))
    assert events == 150
