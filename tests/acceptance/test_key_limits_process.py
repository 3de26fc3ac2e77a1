"""``key:`` in-flight caps with real processes: ``python -m relay`` and two workers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from sqlalchemy import func, select

from tests.acceptance.processes import cluster
from tests.support import submit_task, wait_for
from throttler.db import SessionFactory
from throttler.models import Task, TaskEvent, utcnow
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus

pytestmark = pytest.mark.slow

LABELS: list[tuple[str, ...]] = [
    *[("connector:salesforce",)] * 6,
    *[("connector:hubspot",)] * 3,
    *[()] * 3,
]


def _peak(spans: list[tuple[float, float]]) -> int:
    """The most spans (start, end) open at once (an end and a start at one moment: the
    end first)."""
    changes = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])
    running = peak = 0
    for _, change in changes:
        running += change
        peak = max(peak, running)
    return peak


async def test_each_connector_runs_at_most_two_at_once_and_others_flow(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    # Salesforce's tasks are the oldest: without head-of-line freedom the rest would wait.
    async with sessions.begin() as session:
        for labels in LABELS:
            await submit_task(
                session,
                name="non_blocking_long_running_task",
                account="default",
                payload={"duration": 1},
                now=utcnow(),
                labels=labels,
            )
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "RELAY_LIMITS": "key:connector:* inflight=2",
        "WORKER_CONCURRENCY": "5",
    }
    with cluster(env=env, log_dir=tmp_path) as running:
        running.start("worker")
        running.start("worker")
        running.start("relay")

        async def all_done() -> bool:
            async with sessions() as session:
                done = await session.scalar(
                    select(func.count())
                    .select_from(Task)
                    .where(Task.status == TaskStatus.SUCCEEDED)
                )
                return done == len(LABELS)

        await wait_for(all_done, timeout_s=40, interval_s=0.1, message="every task done")

    async with sessions() as session:
        rows = (
            await session.execute(
                select(Task.labels, TaskEvent.task_id, TaskEvent.at, TaskEvent.event)
                .join(Task, Task.id == TaskEvent.task_id)
                .where(TaskEvent.event.in_([EventKind.STARTED, EventKind.SUCCEEDED]))
            )
        ).all()
    moments: dict[str, dict[EventKind, float]] = defaultdict(dict)
    group: dict[str, str] = {}
    for task_labels, task_id, at, event in rows:
        moments[task_id][EventKind(event)] = at.timestamp()
        group[task_id] = task_labels[0] if task_labels else "-"
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for task_id, seen in moments.items():
        spans[group[task_id]].append((seen[EventKind.STARTED], seen[EventKind.SUCCEEDED]))
    peaks = {name: _peak(found) for name, found in spans.items()}
    report = f"peaks={peaks}"
    print(report)
    assert peaks["connector:salesforce"] == 2, report
    assert peaks["connector:hubspot"] == 2, report
    # Unlabelled tasks are capped by nothing (all three usually run at once; a loaded
    # machine's worker may start one late), and start before salesforce's backlog (three
    # rounds of two) is through.
    assert peaks["-"] >= 2, report
    last_plain_start = max(start for start, _ in spans["-"])
    last_salesforce_start = max(start for start, _ in spans["connector:salesforce"])
    assert last_plain_start < last_salesforce_start, report
