"""The read store's reference answers the same on SQLite and PostgreSQL.

No dialect overrides it (throttler.store.reads), so the parity to hold is between the two
databases: the same rows, the same reads, the same named values back.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.store.both_databases import (
    NOW,
    insert_rows,
    on_both,
    sqlite_and_postgres,
    task_row,
)
from throttler.limits import Scope
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.reads import KeyCounts, ScopeCountsQuery, open_reads

pytestmark = pytest.mark.postgres

AGO = timedelta(seconds=30)
SINCE = NOW - timedelta(seconds=60)


async def _read(settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    await insert_rows(
        engine,
        tasks=[
            task_row("p-1", status=TaskStatus.PENDING, ago=AGO, account="a"),
            task_row(
                "p-2",
                status=TaskStatus.PENDING,
                ago=AGO,
                account="b",
                name="download",
                host="example.org",
            ),
            task_row("q-1", status=TaskStatus.QUEUED, ago=AGO, account="a"),
            task_row(
                "r-1",
                status=TaskStatus.RUNNING,
                ago=AGO,
                account="b",
                name="download",
                host="example.org",
                attempts=1,
            ),
            task_row("s-1", status=TaskStatus.SUCCEEDED, ago=AGO, account="a", finished=True),
            task_row("f-1", status=TaskStatus.FAILED, ago=AGO, account="b", finished=True),
        ],
        outbox_task_ids=["p-1", "p-2"],
        # Dispatched within the window, and one long before it.
        queued_events_ago=[("q-1", AGO), ("r-1", AGO), ("s-1", AGO), ("f-1", timedelta(hours=1))],
    )
    reads = open_reads(settings, engine)
    await reads.ping()
    scopes = [
        ScopeCountsQuery(scope=Scope.TASK),
        ScopeCountsQuery(scope=Scope.ACCOUNT, only=frozenset({"a"})),
        ScopeCountsQuery(scope=Scope.HOST),
    ]
    return {
        "task": await reads.task(task_id="s-1", account="a"),
        "foreign": await reads.task(task_id="s-1", account="b"),
        "missing": await reads.task(task_id="nope", account="a"),
        "terminal": sorted(await reads.terminal_task_ids(["p-1", "r-1", "s-1", "f-1", "nope"])),
        "counts": await reads.relay_counts(scopes=scopes, account=None, since=SINCE),
        "counts_b": await reads.relay_counts(scopes=scopes, account="b", since=SINCE),
    }


async def test_reads_answer_the_same_on_both_databases(
    tmp_path: Path, sqlite_template: Path, postgres_database: str
) -> None:
    async with sqlite_and_postgres(
        tmp_path=tmp_path, sqlite_template=sqlite_template, postgres_url=postgres_database
    ) as databases:
        outcome = await on_both(databases, _read)

    sqlite, postgres = outcome["sqlite"], outcome["postgres"]
    # What the reference answers, so that agreeing on nothing could not pass.
    task = sqlite["task"]
    assert (task.task_id, task.status, task.result) == (
        "s-1",
        TaskStatus.SUCCEEDED,
        {"message": "done"},
    )
    assert task.finished_at == NOW - AGO
    assert (sqlite["foreign"], sqlite["missing"]) == (None, None)
    assert sqlite["terminal"] == ["f-1", "s-1"]
    counts = sqlite["counts"]
    assert counts.totals == KeyCounts(backlog=2, inflight=2, dispatched=3)
    assert counts.by_scope[Scope.TASK] == {
        "greeting": KeyCounts(backlog=1, inflight=1, dispatched=2),
        "download": KeyCounts(backlog=1, inflight=1, dispatched=1),
    }
    assert counts.by_scope[Scope.ACCOUNT] == {"a": KeyCounts(backlog=1, inflight=1, dispatched=2)}
    assert counts.by_scope[Scope.HOST] == {
        "example.org": KeyCounts(backlog=1, inflight=1, dispatched=1)
    }
    assert sqlite["counts_b"].totals == KeyCounts(backlog=1, inflight=1, dispatched=1)
    # And the same on PostgreSQL.
    for key in sqlite:
        assert postgres[key] == sqlite[key], key
