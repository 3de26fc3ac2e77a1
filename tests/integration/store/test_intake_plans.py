"""The intake's idempotency-key read-back looks each key up in the unique index.

A scan would cost what the table holds on every keyed submission: SQLite plans the
reference's ``(account, idempotency_key) IN (VALUES ...)`` as one, so its fast path joins
from the pairs instead; PostgreSQL plans the reference with the indexes. Checked with the
databases' own plans on an empty migrated schema (PostgreSQL with sequential scans
disabled, as in test_task_list_plans.py).
"""

from __future__ import annotations

import sqlite3

from sqlalchemy import select, text, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.store.intake import BOUND_COLUMNS, TASKS
from throttler.store.sqlite_intake import _bound_select

INDEX = "ix_tasks_account_idempotency_key"
PAIRS = [("acme", "k1"), ("acme", "k2"), ("globex", "k1")]


async def test_the_read_back_searches_the_unique_index(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            # The reference, which the PostgreSQL fast path uses as it is.
            statement = select(*BOUND_COLUMNS).where(
                tuple_(TASKS.c.account, TASKS.c.idempotency_key).in_(PAIRS)
            )
            sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            plan = [str(row[0]) for row in await connection.exec_driver_sql(f"EXPLAIN {sql}")]
            # Index look-ups (a bitmap OR of the pairs, or index scans), never a scan.
            assert not any("Seq Scan" in line for line in plan), plan
            assert any("Index" in line and "Cond" not in line for line in plan), plan
            return
        raw = await connection.get_raw_connection()
        driver = raw.driver_connection
        assert driver is not None
        # aiosqlite wraps the sqlite3 connection the fast path's own thread would hold.
        sqlite: sqlite3.Connection = driver._conn
        sql = _bound_select().sql.format(", ".join(["(?, ?)"] * len(PAIRS)))
        values = [value for pair in PAIRS for value in pair]
        plan = [row[-1] for row in sqlite.execute(f"EXPLAIN QUERY PLAN {sql}", values)]
    reads = [line for line in plan if line.startswith(("SCAN tasks", "SEARCH tasks"))]
    assert reads == [f"SEARCH tasks USING INDEX {INDEX} (account=? AND idempotency_key=?)"], plan
