"""A claim's lease finds its tasks through the primary key, whatever the backlog.

The statements a real claim of 100 tasks runs to lease them are captured as the database
receives them and planned again, on a backlog of 5,000 pending tasks. Each statement that
touches ``tasks`` must reach it by its primary key: with a plain status condition beside
the ids, SQLite (which has no statistics unless someone runs ANALYZE) read every pending
task through ix_tasks_status_name and passed each through the id list, a cost that grew
with the backlog (43 ms a claim of 1,000 with 50,000 pending; throttler.store.outbox).
PostgreSQL's statistics are fresh here, as autovacuum keeps them; it may scan a table this
small rather than look 100 keys up (its cost model's choice, which it gives up as the
table grows), but never through a status index.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.seeded import greetings
from tests.integration.store.test_intake_parity import NOW
from throttler.settings import Settings
from throttler.store.intake import insert_submissions
from throttler.store.outbox import open_outbox

BACKLOG = 5_000
CLAIM = 100


async def _pending_backlog(engine: AsyncEngine) -> None:
    tasks = greetings(BACKLOG, start=NOW)
    async with engine.begin() as connection:
        await insert_submissions(connection, tasks)
    if engine.dialect.name == "postgresql":
        async with engine.connect() as connection:
            await connection.execute(text("ANALYZE"))
            await connection.commit()


async def _lease_statements(settings: Settings, engine: AsyncEngine) -> list[tuple[str, Any]]:
    """Claim and lease CLAIM tasks: the statements that set the claim's transaction up, or
    wrote ``tasks`` or ``task_events``."""
    seen: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        # The claim's transaction settings (PostgreSQL), and what wrote tasks or events.
        if statement.startswith(("SELECT set_config", "UPDATE tasks", "INSERT INTO task_events")):
            seen.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with open_outbox(settings=settings, engine=engine).claiming() as claim:
            claims = await claim.select_claimable(limit=CLAIM, now=NOW)
            assert len(claims) == CLAIM
            await claim.lease(
                claims=claims, queued_at=[NOW] * len(claims), relay_id="r", lease_s=30
            )
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    assert any(sql.startswith("UPDATE tasks") for sql, _ in seen), seen
    return seen


async def _plan(
    engine: AsyncEngine, sql: str, parameters: Any, preamble: list[tuple[str, Any]]
) -> list[str]:
    # An executemany's statement (its rows in a list), planned with its first row.
    one = parameters[0] if isinstance(parameters, list) else parameters
    explain = "EXPLAIN QUERY PLAN" if engine.dialect.name == "sqlite" else "EXPLAIN"
    async with engine.connect() as connection, connection.begin():
        # In a transaction set up as the claim's was.
        for setting, values in preamble:
            await connection.exec_driver_sql(setting, values)
        rows = await connection.exec_driver_sql(f"{explain} {sql}", tuple(one))
        plan = [str(row[-1]) for row in rows]
        await connection.rollback()
    return plan


def _reaches_tasks_by_key(dialect: str, plan: list[str]) -> bool:
    if dialect == "sqlite":
        on_tasks = [line for line in plan if line.startswith(("SCAN tasks", "SEARCH tasks"))]
        return bool(on_tasks) and all(
            line.startswith("SEARCH tasks USING")
            and line.endswith("INDEX sqlite_autoindex_tasks_1 (id=?)")
            for line in on_tasks
        )
    on_tasks = [line for line in plan if "Scan" in line and " on tasks" in line]
    return bool(on_tasks) and all(
        "using pk_tasks on tasks" in line or "Seq Scan on tasks" in line for line in on_tasks
    )


async def test_a_lease_looks_its_tasks_up_by_primary_key(
    settings: Settings, engine: AsyncEngine
) -> None:
    await _pending_backlog(engine)
    statements = await _lease_statements(settings, engine)
    preamble = [(sql, values) for sql, values in statements if sql.startswith("SELECT")]
    assert len(preamble) == (engine.dialect.name == "postgresql"), preamble
    for sql, parameters in statements:
        if not sql.startswith("UPDATE tasks"):
            # The events' insert reads no task (its foreign key is checked by key).
            continue
        plan = await _plan(engine, sql, parameters, preamble)
        assert _reaches_tasks_by_key(engine.dialect.name, plan), (sql[:300], plan)
