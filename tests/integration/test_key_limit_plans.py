"""``key:`` limits cost the claim what the other scopes do, at any backlog.

Two statements are new: the claim's per-account read with labels left out (a full or
out-of-tokens label's tasks skipped in SQL, so that they hold back nothing), and the
count of in-flight tasks per label. Checked with the databases' own plans on thousands
of analysed rows (the planners' choice of join depends on statistics): the claim still
walks ix_tasks_pending_turn in rank order, each task's excluded labels looked up by
task_labels' primary key (never a scan or a hash of the label table, which grows with
every task ever labelled); the count starts from the few in-flight tasks
(ix_tasks_status_name) and reads their labels by the same primary key. No index is
needed beyond those of migrations 0003, 0005 and 0008.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import ClauseElement, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from tests.integration.seeded import DATABASES, insert_tasks, seeded_database_url, seeded_engine
from throttler.models import Task
from throttler.statuses import TaskStatus
from throttler.store.outbox import CoreClaim, Exclusions, _pending_filters
from throttler.store.postgres_outbox import PostgresClaim, first_of_each_lateral
from throttler.store.sqlite_outbox import SqliteClaim, first_of_each_json
from throttler.submit import NewTask

COUNT = 20_000
EXCLUDED = Exclusions(labels=frozenset({"connector:c1", "connector:c2", "tenant:t3"}))


async def _seed(engine: AsyncEngine) -> None:
    """``COUNT`` tasks of three accounts: most finished, a third pending, a few in flight;
    most labelled (connectors and tenants, with strides that do not correlate); then
    ANALYZE, so that the planners choose with statistics, as on a real table."""
    start = datetime(2026, 11, 1, tzinfo=UTC)
    tasks = [
        NewTask(
            name="greeting",
            account=("a", "b", "c")[index % 3],
            payload={"name": "x"},
            created_at=start + timedelta(seconds=index),
            labels=(
                *((f"connector:c{index % 7}",) if index % 5 else ()),
                *((f"tenant:t{index % 11}",) if index % 4 == 0 else ()),
            ),
        )
        for index in range(COUNT)
    ]
    await insert_tasks(engine, tasks)
    async with engine.begin() as connection:
        for status, share in (
            (TaskStatus.SUCCEEDED, slice(0, None, 3)),
            (TaskStatus.FAILED, slice(1, None, 6)),
            (TaskStatus.QUEUED, slice(2, None, 400)),
            (TaskStatus.RUNNING, slice(5, None, 400)),
        ):
            await connection.execute(
                update(Task)
                .where(Task.id.in_([t.task_id for t in tasks[share]]))
                .values(status=status)
            )
    async with engine.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        await connection.exec_driver_sql("ANALYZE")


@pytest.fixture(scope="module", params=DATABASES)
def seeded_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> str:
    """A database seeded once for this module's tests: they only read plans from it."""
    return seeded_database_url(
        request, tmp_path_factory, sqlite_template, name="key_limit_plans", seed=_seed
    )


@pytest.fixture
async def engine(seeded_url: str) -> AsyncIterator[AsyncEngine]:
    """The seeded database; seeded again should another test have emptied it since (the
    PostgreSQL one is this test process's, which every other test empties first)."""
    async with seeded_engine(seeded_url, count=COUNT, seed=_seed) as engine:
        yield engine


async def _plan(engine: AsyncEngine, statement: ClauseElement) -> list[str]:
    sql = str(statement.compile(engine, compile_kwargs={"literal_binds": True}))
    async with engine.connect() as connection:
        explain = "EXPLAIN" if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN"
        rows = await connection.exec_driver_sql(f"{explain} {sql}")
        return [str(row[-1]).strip() for row in rows]


def _claim_type(engine: AsyncEngine) -> type[CoreClaim]:
    return SqliteClaim if engine.dialect.name == "sqlite" else PostgresClaim


async def test_the_claim_skips_excluded_labels_by_primary_key_in_rank_order(
    engine: AsyncEngine,
) -> None:
    sqlite = engine.dialect.name == "sqlite"
    async with engine.connect() as connection:
        claim = _claim_type(engine)(AsyncSession(bind=connection))
    filters = _pending_filters(
        due_by=datetime(2026, 12, 1, tzinfo=UTC),
        excluding=EXCLUDED,
        without_labels=claim.without_labels,
    )
    # The statement the claim runs (its accounts as one array), with its values inlined.
    if sqlite:
        statement = first_of_each_json(filters).params(accounts='["a", "b"]', depth=100)
    else:
        statement = first_of_each_lateral(filters).params(accounts=["a", "b"], depth=100)
    plan = await _plan(engine, statement)
    shown = "\n".join(plan)
    if sqlite:
        tasks = [line for line in plan if " tasks " in f"{line} "]
        # Per account, the walk of ix_tasks_pending_turn; then each task chosen by key.
        assert tasks == [
            "SEARCH tasks USING INDEX ix_tasks_pending_turn (account=?)",
            "SEARCH tasks USING INDEX sqlite_autoindex_tasks_1 (id=?)",
        ], shown
        labels = [line for line in plan if "task_labels" in line]
        # Each task's excluded labels: one seek of the primary key (task_id, label).
        assert len(labels) == 1, shown
        assert all(
            line.startswith("SEARCH task_labels USING")
            and "sqlite_autoindex_task_labels_1 (task_id=? AND label=?)" in line
            for line in labels
        ), shown
        assert not any("TEMP B-TREE" in line for line in plan), shown
        # Nothing read whole but the array of accounts.
        assert [line for line in plan if line.startswith("SCAN")] == [
            line for line in plan if line.startswith("SCAN") and "VIRTUAL TABLE" in line
        ], shown
    else:
        scans = [line for line in plan if " Scan " in line and " on tasks" in line]
        assert scans, shown
        assert all("Index Scan using ix_tasks_pending_turn on tasks" in line for line in scans), (
            shown
        )
        # Each task's outbox row by its unique task_id, nothing read whole.
        assert any("using uq_outbox_task_id on outbox" in line for line in plan), shown
        assert not any("Seq Scan" in line for line in plan), shown
        # The task's own labels (?| on tasks.labels): no subplan, task_labels not read.
        assert not any("task_labels" in line or "SubPlan" in line for line in plan), shown
        assert any("labels ?|" in line for line in plan), shown
        assert not any("Sort" in line for line in plan), shown


async def test_inflight_per_label_starts_from_the_tasks_in_flight(engine: AsyncEngine) -> None:
    plan = await _plan(engine, _claim_type(engine).inflight_by_label)
    shown = "\n".join(plan)
    if engine.dialect.name == "sqlite":
        assert plan[0].startswith("SEARCH tasks USING INDEX ix_tasks_status_"), shown
        assert plan[0].endswith("(status=?)"), shown
        assert plan[1].startswith("SEARCH task_labels USING"), shown
        assert plan[1].endswith("sqlite_autoindex_task_labels_1 (task_id=?)"), shown
        assert not any(line.startswith("SCAN") for line in plan), shown
    else:
        # The in-flight tasks by an index on status, their labels from their own JSONB.
        reads = [line for line in plan if "Scan" in line]
        assert reads, shown
        assert not any("Seq Scan" in line or "task_labels" in line for line in plan), shown
        assert any("Index Scan" in line and "ix_tasks_status_" in line for line in reads), shown
