"""``python -m bench.worker``: greetings per second through the real worker, against ARQ's ceiling.

Each run fills a fresh database with queued greeting tasks (as the relay leaves them: rows
``queued`` with their ``submitted`` and ``queued`` events, no outbox rows) and ARQ jobs with
the task ids, then runs ``python -m worker`` until the queue is empty. The baseline is a
plain ARQ worker whose ``greeting`` is a no-op coroutine, with the same concurrency, poll
delay and result keeping, over the same number of jobs, in the same run. Both are timed by
ARQ's own stamps (first job start to last job finish), so process start-up is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func
from sqlalchemy import delete, text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.figures import Figure, Target, median, render
from bench.processes import migrate, module_process, postgres_database
from devtools.redis_server import RedisServer, start_redis_server
from throttler.db import create_engine, create_session_factory
from throttler.job_ids import Dispatch
from throttler.models import Base, OutboxEntry, utcnow
from throttler.settings import Settings
from throttler.store.intake import insert_submissions
from throttler.store.outbox import CoreClaim
from throttler.submit import NewTask

# The first one set names a server where the benchmark may create a database of its own.
BASELINE_NAME = "ARQ no-op worker"
# Issue 8: status writes cost no throughput against ARQ running jobs that do nothing.
TARGET = Target(at_least=1.0, of_baseline=True)
# Rows per insert transaction while filling (keeps each statement well within limits).
FILL_CHUNK = 1000
DRAIN_TIMEOUT_S = 120.0
DRAIN_POLL_S = 0.05


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    jobs: int
    runs: int


QUICK = Sizes(jobs=200, runs=1)
FULL = Sizes(jobs=3000, runs=3)


# Jobs one worker process runs at once, on both sides (WORKER_CONCURRENCY / ARQ max_jobs,
# the default). At 10 a job's two commits (each waiting for the writer's turn) leave too
# few jobs in flight to fill a batch: 0.30x the baseline.
CONCURRENCY = 100


def _worker_settings(concurrency: int) -> Settings:
    """The worker settings both sides run with: the environment's, at ``concurrency``."""
    return Settings().model_copy(update={"worker_concurrency": concurrency})


async def _fill_database(database_url: str, *, jobs: int) -> list[str]:
    """Insert ``jobs`` greeting tasks as the relay leaves them; return their ARQ job ids
    (each names its dispatch, ``throttler.job_ids``)."""
    engine = create_engine(Settings(database_url=database_url))
    sessions = create_session_factory(engine)
    ids: list[str] = []
    try:
        for start in range(0, jobs, FILL_CHUNK):
            now = utcnow()
            batch = [
                NewTask(
                    name="greeting", account="default", payload={"name": f"n{i}"}, created_at=now
                )
                for i in range(start, min(start + FILL_CHUNK, jobs))
            ]
            async with sessions.begin() as session:
                await insert_submissions(session, batch)
                task_ids = [task.task_id for task in batch]
                await CoreClaim(session).mark_queued(task_ids=task_ids, relay_id="bench", now=now)
                # The relay deletes outbox rows once their jobs are in ARQ.
                await session.execute(delete(OutboxEntry))
            ids.extend(Dispatch.of(task_id, queued_at=now).job_id for task_id in task_ids)
    finally:
        await engine.dispose()
    return ids


async def _enqueue(pool: ArqRedis, *, queue_name: str, task_ids: list[str]) -> None:
    """Enqueue one ARQ job per id exactly as the relay does: function name, job id, no args."""
    for start in range(0, len(task_ids), FILL_CHUNK):
        jobs = await asyncio.gather(
            *(
                pool.enqueue_job("greeting", _job_id=task_id, _queue_name=queue_name)
                for task_id in task_ids[start : start + FILL_CHUNK]
            )
        )
        if any(job is None for job in jobs):
            raise RuntimeError("ARQ refused a job id: Redis was not empty")


async def _span_s(pool: ArqRedis, *, jobs: int) -> float:
    """First job start to last job finish, from ARQ's results of every job."""
    results = await pool.all_job_results()
    if len(results) != jobs:
        raise RuntimeError(f"expected {jobs} job results, found {len(results)}")
    if not all(result.success for result in results):
        raise RuntimeError("a job failed in ARQ")
    first = min(result.start_time for result in results)
    last = max(result.finish_time for result in results)
    return (last - first).total_seconds()


@contextlib.asynccontextmanager
async def _pool(redis_url: str) -> AsyncIterator[ArqRedis]:
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        yield pool
    finally:
        await pool.aclose()


async def _drain(
    pool: ArqRedis, process: subprocess.Popen[bytes], *, queue_name: str, jobs: int
) -> float:
    """Wait until the queue is empty (ARQ removes a job and stores its result atomically)."""
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while await pool.zcard(queue_name):
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.args!r} did not drain {jobs} jobs")
        await asyncio.sleep(DRAIN_POLL_S)
    return jobs / await _span_s(pool, jobs=jobs)


async def _measure(
    *, redis_url: str, database_url: str | None, jobs: int, settings: Settings
) -> float:
    """One run: jobs/s of the real worker on ``database_url``, or of the no-op baseline."""
    queue_name = f"bench:{uuid.uuid4().hex[:8]}"
    async with _pool(redis_url) as pool:
        await pool.flushall()
        if database_url is None:
            task_ids = [str(uuid.uuid4()) for _ in range(jobs)]
            args = [
                "bench.worker",
                "noop-worker",
                "--redis-url",
                redis_url,
                "--queue",
                queue_name,
                "--concurrency",
                str(settings.worker_concurrency),
            ]
            env = dict(os.environ)
        else:
            task_ids = await _fill_database(database_url, jobs=jobs)
            args = ["worker"]
            env = {
                **os.environ,
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "ARQ_QUEUE_NAME": queue_name,
                "WORKER_CONCURRENCY": str(settings.worker_concurrency),
                "LOG_LEVEL": "INFO",
            }
        await _enqueue(pool, queue_name=queue_name, task_ids=task_ids)
        with module_process(args, env) as process:
            rate = await _drain(pool, process, queue_name=queue_name, jobs=jobs)
        if database_url is not None:
            await _check_all_succeeded(database_url, jobs=jobs)
        return rate


async def _check_all_succeeded(database_url: str, *, jobs: int) -> None:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            done = await connection.scalar(
                text("SELECT count(*) FROM tasks WHERE status = 'succeeded'")
            )
            events = await connection.scalar(
                text("SELECT count(*) FROM task_events WHERE event IN ('started', 'succeeded')")
            )
    finally:
        await engine.dispose()
    if done != jobs or events != 2 * jobs:
        raise RuntimeError(f"{done} of {jobs} tasks succeeded with {events} start/end events")


async def _truncate(database_url: str) -> None:
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    finally:
        await engine.dispose()


def run(*, quick: bool, concurrency: int = CONCURRENCY) -> list[Figure]:
    """Measure the worker on SQLite (and PostgreSQL when a POSTGRES_ENVS variable is set)."""
    sizes = QUICK if quick else FULL
    settings = _worker_settings(concurrency)
    baseline: list[float] = []
    sqlite: list[float] = []
    postgres: list[float] = []
    with (
        tempfile.TemporaryDirectory() as workdir_name,
        postgres_database("bench_worker") as postgres_url,
    ):
        workdir = Path(workdir_name)
        redis: RedisServer = start_redis_server(workdir=workdir / "redis")
        try:
            template = workdir / "template.db"
            migrate({**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{template}"})
            for index in range(sizes.runs):
                database = workdir / f"run{index}.db"
                shutil.copyfile(template, database)
                measure = functools.partial(
                    _measure, redis_url=redis.url, jobs=sizes.jobs, settings=settings
                )
                baseline.append(asyncio.run(measure(database_url=None)))
                sqlite.append(asyncio.run(measure(database_url=f"sqlite+aiosqlite:///{database}")))
                if postgres_url is not None:
                    asyncio.run(_truncate(postgres_url))
                    postgres.append(asyncio.run(measure(database_url=postgres_url)))
        finally:
            redis.stop()
    note = (
        f"{sizes.jobs} jobs, WORKER_CONCURRENCY={settings.worker_concurrency}, "
        f"poll {settings.worker_poll_delay_s:g} s, median of {sizes.runs}"
    )
    figures = [
        Figure(
            name="Worker, greetings with status writes",
            value=median(sqlite),
            unit="jobs/s",
            target=TARGET,
            baseline=median(baseline),
            baseline_name=BASELINE_NAME,
            note=f"SQLite, {note}",
        )
    ]
    if postgres:
        figures.append(
            Figure(
                name="Worker, greetings with status writes",
                value=median(postgres),
                unit="jobs/s",
                target=TARGET,
                baseline=median(baseline),
                baseline_name=BASELINE_NAME,
                note=f"PostgreSQL, {note}",
            )
        )
    return figures


async def _noop(ctx: dict[Any, Any], *_args: Any, **_kwargs: Any) -> None:
    """The baseline's job: nothing at all."""


def _serve_noop(*, redis_url: str, queue_name: str, concurrency: int) -> None:
    """Run a plain ARQ worker with the real worker's options until it has drained the queue."""
    settings = _worker_settings(concurrency)
    worker = Worker(
        functions=[func(_noop, name="greeting")],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=queue_name,
        max_jobs=settings.worker_concurrency,
        poll_delay=settings.worker_poll_delay_s,
        keep_result=settings.worker_keep_result_s,
        retry_jobs=True,
        log_results=False,
        burst=True,
    )
    worker.run()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run")
    commands = parser.add_subparsers(dest="command")
    noop = commands.add_parser("noop-worker", help="run the baseline worker (used by run)")
    noop.add_argument("--redis-url", required=True)
    noop.add_argument("--queue", required=True)
    noop.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=CONCURRENCY)
    args = parser.parse_args(argv)
    if args.command == "noop-worker":
        _serve_noop(redis_url=args.redis_url, queue_name=args.queue, concurrency=args.concurrency)
        return
    print(render(run(quick=args.quick, concurrency=args.concurrency)))


if __name__ == "__main__":
    main()
