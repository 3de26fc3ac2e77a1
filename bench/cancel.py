"""``python -m bench.cancel``: cancel a pending backlog by filter, and check none starts.

Each run, against ``python -m api`` on a fresh SQLite file (and a fresh PostgreSQL
database when ``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL`` is set) with a private
Redis: 10,000 pending tasks are committed (tasks, outbox rows, events), then
``POST /api/v1/tasks/cancel`` is called until ``remaining`` is 0, timed from the first
call to the last answer (issue 10: at most 2 s). Then ``python -m relay`` and
``python -m worker`` run until a task submitted after the cancel has succeeded (so both
have been through the outbox and the queue since), and the cancelled tasks that started
are counted: the target is none.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from bench.figures import Figure, Target, median, render
from bench.processes import free_port, http_server, migrate, module_process, postgres_database
from devtools.redis_server import start_redis_server
from throttler.models import Task, TaskEvent, utcnow
from throttler.store.intake import insert_submissions
from throttler.submit import NewTask

API = "/api/v1"
# Issue 10: cancel by filter of 10,000 pending tasks in at most 2 s.
CANCEL_TARGET = Target(at_most=2.0)
SETTLE_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    backlog: int
    runs: int


QUICK = Sizes(backlog=500, runs=1)
FULL = Sizes(backlog=10_000, runs=3)


async def _seed(database_url: str, *, count: int) -> None:
    """Commit ``count`` pending greetings as the intake does, in one transaction."""
    start = utcnow()
    tasks = [
        NewTask(
            name="greeting",
            account="default",
            payload={"name": f"n{index}"},
            created_at=start + timedelta(microseconds=index),
        )
        for index in range(count)
    ]
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await insert_submissions(connection, tasks)
    finally:
        await engine.dispose()


async def _started_and_cancelled(database_url: str) -> tuple[int, int]:
    """Tasks with a ``started`` event, and tasks ``cancelled``."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            started = await connection.scalar(
                select(func.count(func.distinct(TaskEvent.task_id))).where(
                    TaskEvent.event == "started"
                )
            )
            cancelled = await connection.scalar(
                select(func.count()).select_from(Task).where(Task.status == "cancelled")
            )
    finally:
        await engine.dispose()
    return int(started or 0), int(cancelled or 0)


def _cancel_all(base_url: str) -> tuple[float, int]:
    """Call the cancel by filter until nothing remains; return (seconds, calls)."""
    with httpx.Client(base_url=base_url, timeout=60.0, trust_env=False) as client:
        began = time.perf_counter()
        calls = 0
        while True:
            answer = client.post(f"{API}/tasks/cancel", json={})
            calls += 1
            answer.raise_for_status()
            if answer.json()["remaining"] == 0:
                return time.perf_counter() - began, calls


def _sentinel_ran(base_url: str) -> None:
    """Submit one task and wait for its success: relay and worker went through since."""
    with httpx.Client(base_url=base_url, timeout=10.0, trust_env=False) as client:
        task_id = client.post(f"{API}/task/greeting", json={"name": "after"}).json()["task_id"]
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            view = client.get(f"{API}/task/result/{task_id}", params={"wait": 5}).json()
            if view["status"] == "succeeded":
                return
            if view["status"] in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"the sentinel task did not succeed: {view}")


@dataclass(frozen=True, kw_only=True, slots=True)
class Run:
    seconds: float
    calls: int
    started: int


def _one_run(database_url: str, *, redis_url: str, backlog: int, workdir: Path) -> Run:
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_KEYS": "",
        "RELAY_RATE": "0",
        "RELAY_LIMITS": "",
        "RELAY_MAX_INFLIGHT": "0",
        "LOG_LEVEL": "WARNING",
    }
    migrate(env)
    asyncio.run(_seed(database_url, count=backlog))
    port = free_port()
    with ExitStack() as stack:
        base_url = stack.enter_context(http_server(["api"], {**env, "API_PORT": str(port)}, port))
        seconds, calls = _cancel_all(base_url)
        for name in ("relay", "worker"):
            log = stack.enter_context((workdir / f"{name}.log").open("wb"))
            stack.enter_context(module_process([name], env, output=log))
        _sentinel_ran(base_url)
    started, cancelled = asyncio.run(_started_and_cancelled(database_url))
    if cancelled != backlog:
        raise RuntimeError(f"{cancelled} of {backlog} tasks are cancelled")
    # The sentinel started once; any other start is a cancelled task's.
    return Run(seconds=seconds, calls=calls, started=started - 1)


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    results: dict[str, list[Run]] = {"SQLite": [], "PostgreSQL": []}
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        try:
            for index in range(sizes.runs):
                path = workdir / f"cancel-{index}.db"
                results["SQLite"].append(
                    _one_run(
                        f"sqlite+aiosqlite:///{path}",
                        redis_url=redis.url,
                        backlog=sizes.backlog,
                        workdir=workdir,
                    )
                )
                with postgres_database("bench_cancel") as postgres_url:
                    if postgres_url is not None:
                        results["PostgreSQL"].append(
                            _one_run(
                                postgres_url,
                                redis_url=redis.url,
                                backlog=sizes.backlog,
                                workdir=workdir,
                            )
                        )
        finally:
            redis.stop()
    runs = f"median of {sizes.runs}" if sizes.runs > 1 else "1 run"
    figures: list[Figure] = []
    for database, done in results.items():
        if not done:
            continue
        figures += [
            Figure(
                name=f"Cancel by filter, {sizes.backlog:,} pending, {database}",
                value=median([r.seconds for r in done]),
                unit="s",
                target=CANCEL_TARGET,
                note=f"POST /tasks/cancel until remaining 0 ({done[0].calls} call), {runs}",
            ),
            Figure(
                name=f"Cancelled tasks started afterwards, {database}",
                value=max(r.started for r in done),
                unit="tasks",
                target=Target(at_most=0),
                note="relay and worker run until a later task succeeded, every run",
            ),
        ]
    return figures


def main() -> None:
    print(render(run(quick="--quick" in sys.argv[1:])))


if __name__ == "__main__":
    main()
