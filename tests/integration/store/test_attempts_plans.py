"""A worker's batch finds its tasks through the primary key, whatever the table holds.

The statements a real batch of starts and outcomes runs are captured as the database
receives them and planned again with the batch's own transaction settings, on a table of
5,000 queued tasks with fresh statistics: a size at which PostgreSQL's cost model prefers
to scan the whole table (or, with a status condition beside the ids, the status index)
to 100 look-ups by key, and then passes every row through the id list, for each
statement of each batch. That cost grows with the backlog, and it was most of the
database's CPU in the end-to-end bench (throttler.store.attempts). SQLite's fast path
runs its own statements, planned here by SQLite.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from sqlalchemy import event, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.seeded import greetings
from tests.integration.store.test_intake_parity import NOW
from throttler.job_ids import Dispatch
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.attempts import TASKS, Outcome, open_attempts
from throttler.store.intake import insert_submissions
from throttler.store.sqlite_attempts import _statements

BACKLOG = 5_000
BATCH = 100


async def _queued_backlog(engine: AsyncEngine) -> list[str]:
    tasks = greetings(BACKLOG, start=NOW)
    async with engine.begin() as connection:
        await insert_submissions(connection, tasks)
        await connection.execute(
            update(TASKS).values(status=TaskStatus.QUEUED.value, queued_at=NOW)
        )
    async with engine.connect() as connection:
        await connection.execute(text("ANALYZE"))
        await connection.commit()
    return [task.task_id for task in tasks]


async def _batch_statements(
    settings: Settings, engine: AsyncEngine, ids: list[str]
) -> list[tuple[str, Any]]:
    """Start BATCH tasks, then record their outcomes: every statement the driver ran, with
    its values (the fast path runs them on the driver itself)."""
    seen: list[tuple[str, Any]] = []

    def log(query: Any) -> None:
        seen.append((query.query, query.args))

    def capture(dbapi_connection: Any, *_: Any) -> None:
        dbapi_connection.driver_connection.add_query_logger(log)

    event.listen(engine.sync_engine.pool, "checkout", capture)
    attempts = open_attempts(settings, engine)
    try:
        batch = ids[:BATCH]
        writes = await attempts.write(
            starts=[Dispatch.of(task_id, queued_at=NOW) for task_id in batch],
            outcomes=[],
            worker_id="w",
            now=NOW,
        )
        assert len(writes.started) == BATCH
        outcomes = [
            Outcome(
                task_id=task_id,
                event=EventKind.SUCCEEDED,
                attempt=1,
                worker_id="w",
                now=NOW,
                result={},
            )
            for task_id in batch
        ]
        writes = await attempts.write(starts=[], outcomes=outcomes, worker_id="w", now=NOW)
        assert len(writes.recorded) == BATCH
    finally:
        event.remove(engine.sync_engine.pool, "checkout", capture)
        await attempts.close()
    return seen


async def _postgres_plans(settings: Settings, engine: AsyncEngine, ids: list[str]) -> None:
    statements = await _batch_statements(settings, engine, ids)
    preamble = [(sql, values) for sql, values in statements if sql.startswith("BEGIN; ")]
    reads = [
        (sql, values)
        for sql, values in statements
        if "FROM tasks" in sql or sql.startswith("UPDATE tasks")
    ]
    assert len(preamble) == 2, statements
    # The two lock-and-read statements and the start, each by the batch's ids.
    assert sum("IN (" in sql or "ANY" in sql for sql, _ in reads) >= 3, reads
    async with engine.connect() as connection:
        for sql, values in reads:
            async with connection.begin():
                # The batch's transaction settings, as the batch set them.
                await connection.exec_driver_sql(preamble[0][0].removeprefix("BEGIN; "))
                # An executemany's statement (its rows in a list), planned with its first row.
                one = values[0] if isinstance(values, list) else values
                rows = await connection.exec_driver_sql(f"EXPLAIN {sql}", tuple(one))
                plan = "\n".join(str(row[0]) for row in rows)
                await connection.rollback()
            touching = [
                line for line in plan.splitlines() if "Scan" in line and " on tasks" in line
            ]
            assert touching, plan
            assert all("using pk_tasks on tasks" in line for line in touching), plan[:2000]


def _sqlite_plans(settings: Settings) -> None:
    statements = _statements()
    path = settings.database_url.split("///", 1)[1]
    with sqlite3.connect(path) as connection:
        for statement in (statements.locked, statements.start):
            values = statement.bind({"task_ids": json.dumps(["a", "b"]), "now": NOW})
            plan = [
                row[-1] for row in connection.execute(f"EXPLAIN QUERY PLAN {statement.sql}", values)
            ]
            on_tasks = [line for line in plan if line.startswith(("SCAN tasks", "SEARCH tasks"))]
            assert on_tasks, plan
            assert all(
                line.startswith("SEARCH tasks USING")
                and line.endswith("INDEX sqlite_autoindex_tasks_1 (id=?)")
                for line in on_tasks
            ), plan


async def test_a_batch_looks_its_tasks_up_by_primary_key(
    settings: Settings, engine: AsyncEngine
) -> None:
    ids = await _queued_backlog(engine)
    if engine.dialect.name == "postgresql":
        await _postgres_plans(settings, engine, ids)
    else:
        _sqlite_plans(settings)
