"""Every filtered page of GET /tasks reads its rows from an index, already in order.

What makes a page cost the same at 10 tasks and at 1,000,000: each branch of the
statement is an index range (equalities on its leading columns, a range on its
(created_at, id) tail) read backwards under a LIMIT, and no sort ever covers more than
the page's branches. Checked with the databases' own plans on an empty migrated schema;
on PostgreSQL sequential scans are disabled so that the planner shows what the indexes
allow rather than what suits a tiny table (a Sort node would still show if one were
needed).
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.statuses import TaskStatus
from throttler.store.reads import TaskKey, TaskQuery, page_statement

AFTER = TaskKey(created_at=datetime(2026, 11, 29, tzinfo=UTC), task_id="t")
SINCE = datetime(2026, 1, 1, tzinfo=UTC)
FAILED = frozenset({TaskStatus.FAILED})
SOME = frozenset({TaskStatus.FAILED, TaskStatus.PENDING})

QUERIES = {
    "all": (TaskQuery(account="a"), "ix_tasks_account_created_at_id"),
    "all-next-page": (
        TaskQuery(account="a", after=AFTER, created_after=SINCE, created_before=AFTER.created_at),
        "ix_tasks_account_created_at_id",
    ),
    "status": (TaskQuery(account="a", statuses=FAILED), "ix_tasks_account_status_created_at_id"),
    "statuses-next-page": (
        TaskQuery(account="a", statuses=SOME, after=AFTER),
        "ix_tasks_account_status_created_at_id",
    ),
    "name": (TaskQuery(account="a", name="greeting"), "ix_tasks_account_name_status_created_at_id"),
    "name-statuses-next-page": (
        TaskQuery(account="a", name="greeting", statuses=SOME, after=AFTER, created_after=SINCE),
        "ix_tasks_account_name_status_created_at_id",
    ),
}


async def _plan(engine: AsyncEngine, query: TaskQuery) -> list[str]:
    sql = str(page_statement(query).compile(engine, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            rows = await connection.exec_driver_sql(f"EXPLAIN {sql}")
        else:
            rows = await connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}")
        return [str(row[-1]).strip() for row in rows]


@pytest.mark.parametrize(("query", "index"), QUERIES.values(), ids=list(QUERIES))
async def test_page_reads_an_index_in_order(
    engine: AsyncEngine, query: TaskQuery, index: str
) -> None:
    plan = await _plan(engine, query)
    shown = "\n".join(plan)

    if engine.dialect.name == "postgresql":
        reads = [line for line in plan if " on tasks" in line]
        assert reads, shown
        assert all(f"Index Scan Backward using {index} on tasks" in line for line in reads), shown
        # Several statuses: their ordered ranges merged (Merge Append), never sorted.
        assert not any("Sort" in line and "Sort Key" not in line for line in plan), shown
    else:
        reads = [line for line in plan if line.startswith(("SCAN tasks", "SEARCH tasks"))]
        assert reads, shown
        assert all(
            line.startswith(f"SEARCH tasks USING INDEX {index} (account=?") for line in reads
        )
        if len(reads) == 1:
            assert not any("TEMP B-TREE" in line for line in plan), shown
        else:
            # SQLite orders each branch's subquery result (at most limit + 1 rows) to merge
            # them: a sort over the page's candidates, not over the table.
            assert all(line.startswith("SCAN anon_") for line in plan if line.startswith("SCAN")), (
                shown
            )
