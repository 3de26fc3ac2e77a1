"""The recovery store's reference leaves the same rows on SQLite and PostgreSQL.

No dialect overrides it (throttler.store.recovery), so the parity to hold is between the
two databases: the same rows in, the same calls, the same answers and every column of
``tasks``, ``outbox`` and ``task_events`` the same afterwards, ids and times included.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.store.both_databases import (
    NOW,
    all_rows,
    insert_rows,
    on_both,
    sqlite_and_postgres,
    task_row,
)
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.recovery import open_recovery

pytestmark = pytest.mark.postgres

LONG_AGO = timedelta(minutes=10)
GRACE_CUTOFF = NOW - timedelta(seconds=15)


async def _recover_and_prune(settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    await insert_rows(
        engine,
        tasks=[
            task_row("q-lost", status=TaskStatus.QUEUED, ago=LONG_AGO),
            task_row("r-lost", status=TaskStatus.RUNNING, ago=LONG_AGO, attempts=1),
            task_row("r-moved", status=TaskStatus.RUNNING, ago=LONG_AGO, attempts=2),
            task_row("q-recent", status=TaskStatus.QUEUED, ago=timedelta(seconds=1)),
            task_row("q-leased", status=TaskStatus.QUEUED, ago=LONG_AGO),
            task_row("p-waiting", status=TaskStatus.PENDING, ago=LONG_AGO),
            task_row("s-old", status=TaskStatus.SUCCEEDED, ago=timedelta(days=10), finished=True),
            task_row("f-old", status=TaskStatus.FAILED, ago=timedelta(days=9), finished=True),
            task_row("c-old", status=TaskStatus.CANCELLED, ago=timedelta(days=8), finished=True),
            task_row("s-new", status=TaskStatus.SUCCEEDED, ago=timedelta(days=1), finished=True),
        ],
        outbox_task_ids=["q-leased", "p-waiting"],
    )
    store = open_recovery(settings, engine)
    candidates = await store.candidates(grace_cutoff=GRACE_CUTOFF, after_task_id="", limit=10)
    after_first = await store.candidates(
        grace_cutoff=GRACE_CUTOFF, after_task_id=candidates[0].task_id, limit=1
    )
    by_id = {candidate.task_id: candidate for candidate in candidates}
    # As a scan saw it before a worker started another attempt: the guard must refuse it.
    stale = dataclasses.replace(by_id["r-moved"], attempts=1)
    async with store.recovering(grace_cutoff=GRACE_CUTOFF, now=NOW) as unit:
        locked = await unit.lock([*candidates, stale])
        requeued = await unit.requeue(by_id["q-lost"], reason="job_missing")
        failed = await unit.fail(by_id["r-lost"], reason="timed_out", error="outcome unknown")
        stale_requeued = await unit.requeue(stale, reason="job_missing")
        again = await unit.requeue(by_id["q-lost"], reason="job_missing")
    pruned = [
        await store.prune_finished(finished_before=NOW - timedelta(days=7), limit=2)
        for _ in range(3)
    ]
    return {
        "candidates": candidates,
        "after_first": after_first,
        "locked": locked,
        "writes": (requeued, failed, stale_requeued, again),
        "pruned": pruned,
        "last_dispatch_at": await store.last_dispatch_at(),
        "rows": await all_rows(engine),
    }


async def test_requeue_fail_and_prune_leave_the_same_rows_on_both_databases(
    tmp_path: Path, sqlite_template: Path, postgres_database: str
) -> None:
    async with sqlite_and_postgres(
        tmp_path=tmp_path, sqlite_template=sqlite_template, postgres_url=postgres_database
    ) as databases:
        outcome = await on_both(databases, _recover_and_prune)

    sqlite, postgres = outcome["sqlite"], outcome["postgres"]
    # What the reference does, so that agreeing on nothing could not pass.
    assert [c.task_id for c in sqlite["candidates"]] == ["q-lost", "r-lost", "r-moved"]
    assert [c.task_id for c in sqlite["after_first"]] == ["r-lost"]
    assert [c.task_id for c in sqlite["locked"]] == ["q-lost", "r-lost", "r-moved"]
    assert sqlite["writes"] == (True, True, False, False)
    assert sqlite["pruned"] == [2, 1, 0]
    remaining = [task["id"] for task in sqlite["rows"]["tasks"]]
    kept = ["p-waiting", "q-leased", "q-lost", "q-recent", "r-lost", "r-moved", "s-new"]
    assert sorted(remaining) == kept
    # And the same on PostgreSQL, to the last column.
    for key in sqlite:
        assert postgres[key] == sqlite[key], key
