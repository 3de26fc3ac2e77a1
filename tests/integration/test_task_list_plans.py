"""Every filtered page of GET /tasks reads its rows from an index, already in order.

What makes a page cost the same at 10 tasks and at 1,000,000: each branch of the
statement is an index range (equalities on its leading columns, a range on its
(created_at, id) tail) read backwards under a LIMIT, and no sort ever covers more than
the page's branches. Checked with the databases' own plans on an empty migrated schema;
on PostgreSQL sequential scans are disabled so that the planner shows what the indexes
allow rather than what suits a tiny table (a Sort node would still show if one were
needed). A label's page joins two tables, so the planners' choice of which drives the
join depends on statistics: those plans are checked on thousands of analysed rows.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.seeded import DATABASES, insert_tasks, seeded_database_url, seeded_engine
from throttler.models import Task
from throttler.statuses import TaskStatus
from throttler.store.reads import TaskKey, TaskQuery, page_statement
from throttler.submit import NewTask

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
    statement = page_statement(query, dialect=engine.dialect.name)
    sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            await connection.execute(text("SET LOCAL enable_seqscan = off"))
            # Statistics an earlier test's ANALYZE left (they outlive TRUNCATE) may make a
            # sort of a few rows the cheapest plan: the question here is whether an index
            # gives the order, so a Sort shows only when none can.
            await connection.execute(text("SET LOCAL enable_sort = off"))
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


LABELLED = {
    "label": TaskQuery(account="a", label="tenant:t1"),
    "label-next-page": TaskQuery(
        account="a",
        label="tenant:t1",
        after=AFTER,
        created_after=SINCE,
        created_before=AFTER.created_at,
    ),
    "label-name-statuses-next-page": TaskQuery(
        account="a", label="tenant:t1", name="greeting", statuses=SOME, after=AFTER
    ),
}


async def _seed_labelled(engine: AsyncEngine, count: int) -> None:
    """``count`` tasks of two accounts, kinds and statuses, a tenth of them labelled; then
    ANALYZE, so that the planners choose with statistics, as on a real table."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    tasks = [
        NewTask(
            # Kinds, accounts, statuses (below) and labels each vary with a different
            # stride, so that no two are correlated.
            name=("greeting", "download")[index // 7 % 2],
            account=("a", "b")[index % 3 == 0],
            payload={"name": "x"},
            created_at=start + timedelta(seconds=index),
            labels=(f"tenant:t{index % 10}",) if index % 10 < 2 else (),
        )
        for index in range(count)
    ]
    await insert_tasks(engine, tasks)
    async with engine.begin() as connection:
        statuses = [status.value for status in TaskStatus]
        for offset, status in enumerate(statuses):
            await connection.execute(
                update(Task)
                .where(Task.id.in_([t.task_id for t in tasks[offset :: len(statuses)]]))
                .values(status=status)
            )
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.exec_driver_sql("ANALYZE")


LABELLED_COUNT = 6000


async def _seed_all_labelled(engine: AsyncEngine) -> None:
    await _seed_labelled(engine, LABELLED_COUNT)


@pytest.fixture(scope="module", params=DATABASES)
def labelled_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> str:
    """A database seeded once for the label pages' tests: they only read plans from it."""
    return seeded_database_url(
        request, tmp_path_factory, sqlite_template, name="task_list_plans", seed=_seed_all_labelled
    )


@pytest.fixture
async def labelled(labelled_url: str) -> AsyncIterator[AsyncEngine]:
    """The labelled database; seeded again should another test have emptied it since (the
    PostgreSQL one is this test process's, which every other test empties first)."""
    async with seeded_engine(labelled_url, count=LABELLED_COUNT, seed=_seed_all_labelled) as engine:
        yield engine


@pytest.mark.parametrize("query", LABELLED.values(), ids=list(LABELLED))
async def test_a_label_page_reads_the_label_index_in_order(
    labelled: AsyncEngine, query: TaskQuery
) -> None:
    engine = labelled
    plan = await _plan(engine, query)
    shown = "\n".join(plan)
    index = "ix_task_labels_account_label_created_at_task_id"

    if engine.dialect.name == "postgresql":
        scans = [line for line in plan if " Scan " in line]
        # The label's range, newest first, then each of its tasks by primary key.
        assert f"Scan Backward using {index} on task_labels" in scans[0], shown
        assert all("using pk_tasks on tasks" in line for line in scans[1:]), shown
        assert len(scans) == 2, shown
        assert not any("Sort" in line and "Sort Key" not in line for line in plan), shown
    else:
        assert plan[0].startswith(f"SEARCH task_labels USING COVERING INDEX {index} (account=?")
        assert plan[1:] == ["SEARCH tasks USING INDEX sqlite_autoindex_tasks_1 (id=?)"], shown
