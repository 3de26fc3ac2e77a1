"""``python -m bench.task_list``: a page of failed tasks with 1,000,000 finished tasks stored.

Issue 10's bound: ``GET /api/v1/tasks?status=failed&limit=100`` answers within 20 ms at
the 99th percentile with 1,000,000 finished tasks in the table, on SQLite and on
PostgreSQL (when ``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL`` is set). For each
database: a fresh migrated database filled by ``bench.task_history`` (set-based, timed),
the plan of the page's statement checked against migration 0005's index (on PostgreSQL
after ANALYZE), then the real ``python -m api`` (with ``API_KEYS``, four accounts), and
from this process one keep-alive client sending requests one after another: the first
page of the largest account's failed tasks, then its ``next_cursor`` for a few pages, and
again. Each request's time is from send to the whole body read; the figures are the
medians over three rounds of each round's p50 and p99 (after an unmeasured warm-up).
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import create_async_engine

from bench.figures import Figure, Target, render
from bench.processes import migrate
from bench.sequential import FULL, QUICK, Sizes, api_on, medians_ms, on_both_databases
from bench.task_history import ACCOUNTS, fill_postgres, fill_sqlite
from throttler.statuses import TaskStatus
from throttler.store.reads import TaskQuery, page_statement

PATH = "/api/v1/tasks"
PARAMS = {"status": "failed", "limit": "100"}
# Issue 10's bound.
P99_TARGET = Target(at_most=20)
INFORMATION = Target()
# Pages read by following next_cursor before starting again from the first.
PAGES = 5
INDEX = "ix_tasks_account_status_created_at_id"
KEYS = {account: f"bench-key-{account}" for account in ACCOUNTS}
# The largest account (40 % of the tasks): its failed tasks are 4 % of the table.
ACCOUNT = ACCOUNTS[0]


@dataclass(frozen=True, kw_only=True, slots=True)
class Measured:
    p50_ms: float
    p99_ms: float
    seed_s: float
    plan: str


def _query() -> TaskQuery:
    return TaskQuery(account=ACCOUNT, statuses=frozenset({TaskStatus.FAILED}), limit=100)


def _plan_sqlite(path: Path) -> str:
    """SQLite's plan of the page's statement; it must search the index, never scan."""
    sql = str(
        page_statement(_query()).compile(
            dialect=sqlite.dialect(), compile_kwargs={"literal_binds": True}
        )
    )
    with sqlite3.connect(path) as connection:
        plan = [str(row[-1]) for row in connection.execute(f"EXPLAIN QUERY PLAN {sql}")]
    if not all(line.startswith(f"SEARCH tasks USING INDEX {INDEX}") for line in plan):
        raise RuntimeError(f"the page does not read {INDEX}: {plan}")
    return plan[0]


async def _explain_postgres(url: str, sql: str) -> list[str]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            return [str(row[0]) for row in await connection.execute(text(f"EXPLAIN {sql}"))]
    finally:
        await engine.dispose()


def _plan_postgres(url: str) -> str:
    """PostgreSQL's plan (with the seeded table's statistics): the index, read in order."""
    sql = str(
        page_statement(_query()).compile(
            dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
            compile_kwargs={"literal_binds": True},
        )
    )
    plan = asyncio.run(_explain_postgres(url, sql))
    reads = [line.strip() for line in plan if " on tasks" in line]
    if not reads or not all(f"Index Scan Backward using {INDEX} on tasks" in r for r in reads):
        raise RuntimeError(f"the page does not read {INDEX} in order: {plan}")
    return reads[0]


def _walk(client: httpx.Client, base_url: str, count: int) -> list[float]:
    """``count`` requests: the first page, then ``next_cursor`` for PAGES pages, again."""
    headers = {"Authorization": f"Bearer {KEYS[ACCOUNT]}"}
    times_s: list[float] = []
    cursor: str | None = None
    page = 0
    seen: set[str] = set()
    while len(times_s) < count:
        params = dict(PARAMS) if cursor is None else {**PARAMS, "cursor": cursor}
        started = time.perf_counter()
        answer = client.get(f"{base_url}{PATH}", params=params, headers=headers)
        body = answer.json()
        times_s.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code} {answer.text[:200]}")
        tasks = body["tasks"]
        if not tasks or any(task["status"] != "failed" for task in tasks):
            raise RuntimeError(f"unexpected page: {len(tasks)} tasks")
        ids = {task["task_id"] for task in tasks}
        if ids & seen:
            raise RuntimeError("a task listed twice while paging")
        seen |= ids
        page += 1
        cursor = body["next_cursor"]
        if cursor is None or page == PAGES:
            cursor, page, seen = None, 0, set()
    return times_s


def _measure(database_url: str, redis_url: str, sizes: Sizes) -> tuple[float, float]:
    """The medians over the rounds of each round's p50 and p99, in ms."""
    keys = ",".join(f"{key}:{account}" for account, key in KEYS.items())
    with (
        api_on(database_url, redis_url, API_KEYS=keys, API_ADMIN_KEYS="") as base_url,
        httpx.Client(timeout=10.0, trust_env=False) as client,
    ):
        return medians_ms(lambda count: _walk(client, base_url, count), sizes)


def measure_sqlite(workdir: Path, redis_url: str, sizes: Sizes) -> Measured:
    path = workdir / "task_list.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrate({**os.environ, "DATABASE_URL": url})
    started = time.monotonic()
    fill_sqlite(path, count=sizes.tasks)
    seed_s = time.monotonic() - started
    plan = _plan_sqlite(path)
    p50, p99 = _measure(url, redis_url, sizes)
    return Measured(p50_ms=p50, p99_ms=p99, seed_s=seed_s, plan=plan)


def measure_postgres(url: str, redis_url: str, sizes: Sizes) -> Measured:
    started = time.monotonic()
    fill_postgres(url, count=sizes.tasks)
    seed_s = time.monotonic() - started
    plan = _plan_postgres(url)
    p50, p99 = _measure(url, redis_url, sizes)
    return Measured(p50_ms=p50, p99_ms=p99, seed_s=seed_s, plan=plan)


def _figures(label: str, measured: Measured, sizes: Sizes) -> list[Figure]:
    index = re.search(r"ix_\w+", measured.plan)
    note = (
        f"{sizes.tasks:,} finished tasks over 4 accounts, seeded in {measured.seed_s:.0f} s; "
        f"status=failed&limit=100 then next_cursor up to {PAGES} pages, "
        f"{sizes.requests} sequential requests per round, median of {sizes.rounds}, "
        f"index {index.group(0) if index else '?'}"
    )
    return [
        Figure(
            name=f"Task list p99, {label}",
            value=measured.p99_ms,
            unit="ms",
            target=P99_TARGET,
            note=note,
        ),
        Figure(
            name=f"Task list p50, {label}",
            value=measured.p50_ms,
            unit="ms",
            target=INFORMATION,
            note="the same requests",
        ),
    ]


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    return on_both_databases(
        "bench_task_list",
        lambda workdir, redis_url: _figures(
            "SQLite", measure_sqlite(workdir, redis_url, sizes), sizes
        ),
        lambda url, redis_url: _figures(
            "PostgreSQL", measure_postgres(url, redis_url, sizes), sizes
        ),
    )


def main() -> None:
    print(render(run(quick="--quick" in sys.argv[1:])))


if __name__ == "__main__":
    main()
