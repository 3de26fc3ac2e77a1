"""The monitoring store's reference answers the same on SQLite and PostgreSQL.

No dialect overrides it (throttler.store.monitoring), but a release's second is computed
by each database its own way (``epoch_second``): the same rows must give the same counts,
failures and seconds on both.
"""

from __future__ import annotations

import math
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.integration.store.both_databases import (
    NOW,
    insert_rows,
    on_both,
    sqlite_and_postgres,
    task_row,
)
from throttler.models import TaskEvent, TaskLabel
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus
from throttler.store.monitoring import (
    Failure,
    LabelReleases,
    ReleaseCounts,
    TaskCounts,
    TaskReleases,
    open_monitoring,
)

pytestmark = pytest.mark.postgres

AGO = timedelta(seconds=30)
LIVE = (TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.RUNNING)
SECOND = math.floor(NOW.timestamp())
DL, HOST = "download", "example.org"


def _sorted(counts: ReleaseCounts) -> ReleaseCounts:
    """The rows in one order: a grouped statement's order is the database's own."""
    return ReleaseCounts(
        tasks=sorted(counts.tasks, key=lambda r: (r.second, r.name, r.account, r.host or "")),
        labels=sorted(counts.labels, key=lambda r: (r.second, r.label)),
    )


async def _read(settings: Settings, engine: AsyncEngine) -> dict[str, Any]:
    await insert_rows(
        engine,
        tasks=[
            task_row("p-1", status=TaskStatus.PENDING, ago=AGO, account="a"),
            task_row("p-2", status=TaskStatus.PENDING, ago=AGO, account="b", name=DL, host=HOST),
            task_row("q-1", status=TaskStatus.QUEUED, ago=AGO, account="a"),
            task_row("q-2", status=TaskStatus.QUEUED, ago=AGO, account="a"),
            task_row("r-1", status=TaskStatus.RUNNING, ago=AGO, account="b", name=DL, host=HOST),
            task_row("s-1", status=TaskStatus.SUCCEEDED, ago=AGO, account="a", finished=True),
            task_row("f-1", status=TaskStatus.FAILED, ago=AGO, account="b", finished=True),
            task_row("f-2", status=TaskStatus.FAILED, ago=AGO, account="a", finished=True),
            task_row("f-3", status=TaskStatus.FAILED, ago=AGO, account="a", finished=True),
        ],
        outbox_task_ids=["p-1", "p-2"],
        # Two in one second (a fraction apart), one a second later, one out of the range.
        queued_events_ago=[
            ("q-1", timedelta(seconds=30.5)),
            ("q-2", timedelta(seconds=30.2)),
            ("r-1", timedelta(seconds=29.5)),
            ("s-1", timedelta(seconds=10)),
            ("f-1", timedelta(hours=1)),
        ],
    )
    async with engine.begin() as connection:
        await connection.execute(
            insert(TaskEvent),
            [
                {"task_id": "f-1", "at": NOW - AGO, "event": EventKind.FAILED, "detail": {}},
                {
                    "task_id": "f-2",
                    "at": NOW - timedelta(seconds=5),
                    "event": EventKind.FAILED,
                    "detail": {"error": "broke"},
                },
                {
                    "task_id": "f-3",
                    "at": NOW - timedelta(days=2),
                    "event": EventKind.FAILED,
                    "detail": {"error": "long ago"},
                },
            ],
        )
        await connection.execute(
            insert(TaskLabel),
            [
                {"task_id": task_id, "label": label, "account": "a", "created_at": NOW - AGO}
                for task_id, label in (("q-1", "tenant:a"), ("q-2", "tenant:a"), ("q-2", "x:y"))
            ],
        )
    monitoring = open_monitoring(settings, engine)
    since = NOW - timedelta(days=1)
    return {
        "all": await monitoring.task_counts(),
        "live": await monitoring.task_counts(statuses=LIVE),
        "failures": await monitoring.failures(account=None, since=since, limit=10),
        "failures_a": await monitoring.failures(account="a", since=since, limit=10),
        "latest": await monitoring.failures(account=None, since=since, limit=1),
        "account": await monitoring.account_of("r-1"),
        "missing": await monitoring.account_of("nope"),
        "releases": _sorted(
            await monitoring.releases(
                since=SECOND - 60, until=SECOND, labels=["tenant:a", "x:y", "none:here"]
            )
        ),
        "unlabelled": _sorted(
            await monitoring.releases(since=SECOND - 60, until=SECOND - 20, labels=[])
        ),
    }


async def test_monitoring_answers_the_same_on_both_databases(
    tmp_path: Path, sqlite_template: Path, postgres_database: str
) -> None:
    async with sqlite_and_postgres(
        tmp_path=tmp_path, sqlite_template=sqlite_template, postgres_url=postgres_database
    ) as databases:
        outcome = await on_both(databases, _read)

    sqlite, postgres = outcome["sqlite"], outcome["postgres"]
    # What the reference answers, so that agreeing on nothing could not pass.
    assert sqlite["all"] == TaskCounts(
        by_status={
            TaskStatus.PENDING: 2,
            TaskStatus.QUEUED: 2,
            TaskStatus.RUNNING: 1,
            TaskStatus.SUCCEEDED: 1,
            TaskStatus.FAILED: 3,
            TaskStatus.CANCELLED: 0,
        },
        outbox_backlog=2,
        outbox_oldest=NOW,
    )
    assert sqlite["live"] == TaskCounts(
        by_status={TaskStatus.PENDING: 2, TaskStatus.QUEUED: 2, TaskStatus.RUNNING: 1},
        outbox_backlog=2,
        outbox_oldest=NOW,
    )
    newest = Failure(
        task_id="f-2", name="greeting", account="a", at=NOW - timedelta(seconds=5), error="broke"
    )
    older = Failure(task_id="f-1", name="greeting", account="b", at=NOW - AGO, error=None)
    assert sqlite["failures"] == [newest, older]
    assert sqlite["failures_a"] == [newest]
    assert sqlite["latest"] == [newest]
    assert (sqlite["account"], sqlite["missing"]) == ("b", None)
    first = math.floor((NOW - timedelta(seconds=30.5)).timestamp())
    second = math.floor((NOW - timedelta(seconds=29.5)).timestamp())
    assert second == first + 1
    later = math.floor((NOW - timedelta(seconds=10)).timestamp())
    assert sqlite["releases"] == ReleaseCounts(
        tasks=[
            TaskReleases(second=first, name="greeting", account="a", host=None, released=2),
            TaskReleases(
                second=second, name="download", account="b", host="example.org", released=1
            ),
            TaskReleases(second=later, name="greeting", account="a", host=None, released=1),
        ],
        labels=[
            LabelReleases(second=first, label="tenant:a", released=2),
            LabelReleases(second=first, label="x:y", released=1),
        ],
    )
    assert sqlite["unlabelled"] == ReleaseCounts(tasks=sqlite["releases"].tasks[:2], labels=[])
    # And the same on PostgreSQL.
    for key in sqlite:
        assert postgres[key] == sqlite[key], key
