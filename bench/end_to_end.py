"""``python -m bench.end_to_end``: greetings in through the bulk endpoint until all succeeded.

Each run, against a private Redis (emptied before each side):

- baseline, bare ARQ on the same cores: one plain ``arq`` worker process (a ``greeting``
  returning the same message, with our worker's ``max_jobs``, ``poll_delay`` and
  ``keep_result``) and this process enqueueing every job with ``enqueue_job``, gathered
  1,000 at a time; timed from the first enqueue until the last job's result (ARQ's own
  finish stamp), no database anywhere;
- ours: the real ``python -m api``, ``python -m relay`` (unlimited) and
  ``python -m worker``, one each with ``make run``'s defaults, on a fresh SQLite file
  (and a fresh PostgreSQL database when ``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL`` is
  set); this process POSTs the greetings to ``/api/v1/tasks``, 1,000 per request over a
  few connections, timed from the first request until every task is ``succeeded`` (the
  last ``finished_at`` the worker recorded). Completion is polled with one indexed count a
  few times a second, so the poll costs the system next to nothing.

Both sides first take one warm-up task through (processes up, connections open), which
the figures leave out. ``--code-dir DIR`` runs our components (and the migrations) from
another checkout of the project, with this harness and this interpreter, so the code before
and after a change can be measured alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvloop
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker, func
from redis import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.figures import Figure, Target, median, render, summary
from bench.processes import (
    READY_TIMEOUT_S,
    ROOT,
    free_port,
    http_server,
    migrate,
    module_process,
    postgres_database,
)
from devtools.redis_server import RedisServer, start_redis_server
from throttler.settings import Settings

BULK = "/api/v1/tasks"
CONNECTIONS = 4
BASELINE_NAME = "bare ARQ: enqueue_job + ARQ worker"
# Issue 8: the durable pipeline keeps at least 90 % of bare ARQ's rate on the same cores.
TARGET = Target(at_least=0.9, of_baseline=True)
FINISH_TIMEOUT_S = 300.0
# How often completion is checked: the end time comes from the recorded stamps, not
# from the poll, so a slow poll loses no precision.
POLL_S = 0.2
WARM_UP_NAME = "warm-up"


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    tasks: int
    per_request: int  # greetings per bulk request, and per gathered chunk of enqueue_job
    runs: int


QUICK = Sizes(tasks=300, per_request=100, runs=1)
FULL = Sizes(tasks=20_000, per_request=1000, runs=3)


@dataclass(frozen=True, kw_only=True, slots=True)
class Drain:
    """One side's run: the figure, and how long handing the tasks in took of it."""

    tasks_per_s: float
    handed_in_s: float  # until the last 202 (ours) or the last enqueue_job (bare ARQ)

    def describe(self) -> str:
        return f"{self.tasks_per_s:,.0f} tasks/s (handed in within {self.handed_in_s:.1f} s)"


def _name(index: int) -> str:
    return f"n{index}"


# --- bare ARQ -------------------------------------------------------------------------


async def greeting(ctx: dict[Any, Any], *_args: Any, **kwargs: Any) -> dict[str, str]:
    """The baseline's job: the message our greeting task returns."""
    return {"message": f"Hello, {kwargs['name']}!"}


def _serve_arq(*, redis_url: str) -> None:
    """A plain ARQ worker with our worker's concurrency, poll delay and result keeping."""
    settings = Settings()
    Worker(
        functions=[func(greeting, name="greeting")],
        redis_settings=RedisSettings.from_dsn(redis_url),
        queue_name=settings.arq_queue_name,
        max_jobs=settings.worker_concurrency,
        poll_delay=settings.worker_poll_delay_s,
        keep_result=settings.worker_keep_result_s,
        log_results=False,
    ).run()


async def _bare_arq(pool: ArqRedis, *, sizes: Sizes, queue_name: str) -> Drain:
    """Enqueue every greeting in gathered chunks; tasks/s until the last result."""
    warm_up = await pool.enqueue_job("greeting", name=WARM_UP_NAME)
    if warm_up is None:
        raise RuntimeError("ARQ refused the warm-up job")
    await warm_up.result(timeout=READY_TIMEOUT_S, poll_delay=0.05)
    started = time.time()
    for start in range(0, sizes.tasks, sizes.per_request):
        stop = min(start + sizes.per_request, sizes.tasks)
        jobs = await asyncio.gather(
            *(pool.enqueue_job("greeting", name=_name(i)) for i in range(start, stop))
        )
        if any(job is None for job in jobs):
            raise RuntimeError("ARQ refused a job")
    handed_in_s = time.time() - started
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    # A job leaves the queue in the transaction that stores its result.
    while await pool.zcard(queue_name):
        if time.monotonic() > deadline:
            raise RuntimeError(f"bare ARQ left {await pool.zcard(queue_name)} jobs")
        await asyncio.sleep(POLL_S)
    results = await pool.all_job_results()
    if len(results) != sizes.tasks + 1 or not all(result.success for result in results):
        raise RuntimeError(f"{len(results)} results for {sizes.tasks + 1} jobs, or a failure")
    finished = max(result.finish_time for result in results).timestamp()
    return Drain(tasks_per_s=sizes.tasks / (finished - started), handed_in_s=handed_in_s)


def measure_bare_arq(*, redis: RedisServer, sizes: Sizes, log_path: Path) -> Drain:
    queue_name = Settings().arq_queue_name

    async def measure() -> Drain:
        pool = await create_pool(RedisSettings.from_dsn(redis.url))
        try:
            await pool.flushall()
            with (
                log_path.open("wb") as log,
                module_process(
                    ["bench.end_to_end", "arq-worker", "--redis-url", redis.url],
                    os.environ,
                    output=log,
                ),
            ):
                return await _bare_arq(pool, sizes=sizes, queue_name=queue_name)
        finally:
            await pool.aclose()

    return uvloop.run(measure())


# --- ours -----------------------------------------------------------------------------


def _bulk_bodies(sizes: Sizes) -> list[bytes]:
    """Every request's body, encoded before the clock starts."""
    return [
        json.dumps(
            {
                "tasks": [
                    {"name": "greeting", "input": {"name": _name(i)}}
                    for i in range(start, min(start + sizes.per_request, sizes.tasks))
                ]
            }
        ).encode()
        for start in range(0, sizes.tasks, sizes.per_request)
    ]


async def _post_all(client: httpx.AsyncClient, bodies: list[bytes]) -> None:
    """POST every body over CONNECTIONS connections; each must be accepted whole."""
    pending = iter(bodies)

    async def connection() -> None:
        for body in pending:
            answer = await client.post(
                BULK, content=body, headers={"Content-Type": "application/json"}
            )
            if answer.status_code != httpx.codes.ACCEPTED:
                raise RuntimeError(f"{BULK}: {answer.status_code} {answer.text[:200]}")

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))


def _utc_timestamp(value: datetime | str) -> float:
    """A stored time as seconds since the epoch (SQLite returns naive UTC text)."""
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


async def _wait_succeeded(engine: AsyncEngine, *, count: int) -> float:
    """Wait until ``count`` tasks succeeded; return the last one's finish time."""
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while True:
        # A fresh transaction per poll: an open one would keep reading one snapshot.
        async with engine.connect() as connection:
            done = await connection.scalar(
                text("SELECT count(*) FROM tasks WHERE status = 'succeeded'")
            )
        if done == count:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"{done} of {count} tasks succeeded")
        await asyncio.sleep(POLL_S)
    async with engine.connect() as connection:
        rows = (
            await connection.execute(text("SELECT status, count(*) FROM tasks GROUP BY status"))
        ).all()
        last = await connection.scalar(text("SELECT max(finished_at) FROM tasks"))
    statuses = {str(status): int(number) for status, number in rows}
    if statuses != {"succeeded": count}:
        raise RuntimeError(f"tasks by status: {statuses}")
    return _utc_timestamp(last)


async def _ours(base_url: str, database_url: str, *, sizes: Sizes) -> Drain:
    bodies = _bulk_bodies(sizes)
    warm_up = json.dumps({"tasks": [{"name": "greeting", "input": {"name": WARM_UP_NAME}}]})
    engine = create_async_engine(database_url)
    limits = httpx.Limits(max_connections=CONNECTIONS)
    try:
        async with httpx.AsyncClient(
            base_url=base_url, timeout=60.0, trust_env=False, limits=limits
        ) as client:
            await _post_all(client, [warm_up.encode()])
            await _wait_succeeded(engine, count=1)
            started = time.time()
            await _post_all(client, bodies)
            handed_in_s = time.time() - started
            finished = await _wait_succeeded(engine, count=sizes.tasks + 1)
    finally:
        await engine.dispose()
    return Drain(tasks_per_s=sizes.tasks / (finished - started), handed_in_s=handed_in_s)


def _component_env(database_url: str, redis_url: str, port: int) -> dict[str, str]:
    """make run's defaults, with a private database and Redis; the relay unlimited."""
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "API_KEYS": "",
        "RELAY_RATE": "0",
        "RELAY_LIMITS": "",
        "RELAY_MAX_INFLIGHT": "0",
    }


@contextmanager
def pipeline(env: Mapping[str, str], *, port: int, code_dir: Path, workdir: Path) -> Iterator[str]:
    """Run api, relay and worker from ``code_dir`` until the block ends; yield the API's URL."""
    with ExitStack() as stack:
        base_url = stack.enter_context(http_server(["api"], env, port, code_dir=code_dir))
        for name in ("relay", "worker"):
            log = stack.enter_context((workdir / f"{name}.log").open("wb"))
            stack.enter_context(module_process([name], env, output=log, code_dir=code_dir))
        yield base_url


def measure_ours(
    database_url: str, *, redis: RedisServer, sizes: Sizes, code_dir: Path, workdir: Path
) -> Drain:
    """One run of our pipeline on a migrated, empty database: tasks/s."""
    client = Redis.from_url(redis.url)
    try:
        client.flushall()
    finally:
        client.close()
    port = free_port()
    env = _component_env(database_url, redis.url, port)
    with pipeline(env, port=port, code_dir=code_dir, workdir=workdir) as base_url:
        return uvloop.run(_ours(base_url, database_url, sizes=sizes))


# --- the figures ----------------------------------------------------------------------


def run(*, quick: bool, code_dir: Path = ROOT, sizes: Sizes | None = None) -> list[Figure]:
    """Measure bare ARQ, then our pipeline on SQLite (and PostgreSQL), ``runs`` times.

    Each run's figures also go to stderr, since the machine is noisy.
    """
    sizes = sizes or (QUICK if quick else FULL)
    bare: list[float] = []
    ours: dict[str, list[float]] = {"SQLite": [], "PostgreSQL": []}
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        try:
            for index in range(sizes.runs):
                drains = {
                    "bare ARQ": measure_bare_arq(
                        redis=redis, sizes=sizes, log_path=workdir / "arq.log"
                    )
                }
                sqlite_url = f"sqlite+aiosqlite:///{workdir}/run{index}.db"
                migrate({**os.environ, "DATABASE_URL": sqlite_url}, code_dir=code_dir)
                drains["SQLite"] = measure_ours(
                    sqlite_url, redis=redis, sizes=sizes, code_dir=code_dir, workdir=workdir
                )
                with postgres_database("bench_e2e", code_dir=code_dir) as postgres_url:
                    if postgres_url is not None:
                        drains["PostgreSQL"] = measure_ours(
                            postgres_url,
                            redis=redis,
                            sizes=sizes,
                            code_dir=code_dir,
                            workdir=workdir,
                        )
                line = "; ".join(f"{label} {drain.describe()}" for label, drain in drains.items())
                bare.append(drains.pop("bare ARQ").tasks_per_s)
                for label, drain in drains.items():
                    ours[label].append(drain.tasks_per_s)
                print(f"# end_to_end run {index + 1}: {line}", file=sys.stderr, flush=True)
        finally:
            redis.stop()
    runs = f"median of {sizes.runs}" if sizes.runs > 1 else "1 run"
    code = "" if code_dir.resolve() == ROOT else f", code of {code_dir}"
    note = (
        f"{sizes.tasks:,} greetings, {sizes.per_request:,} per request over {CONNECTIONS} "
        f"connections, first request to all succeeded, api+relay+worker{code}, {runs}"
    )
    return [
        Figure(
            name=f"End to end, {label}",
            value=median(rates),
            unit="tasks/s",
            target=TARGET,
            baseline=median(bare),
            baseline_name=BASELINE_NAME,
            note=note,
        )
        for label, rates in ours.items()
        if rates
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run")
    parser.add_argument("--tasks", type=int, default=FULL.tasks)
    parser.add_argument("--runs", type=int, default=FULL.runs)
    parser.add_argument(
        "--code-dir",
        type=Path,
        default=ROOT,
        help="run api, relay, worker and the migrations from this checkout (default: this one)",
    )
    commands = parser.add_subparsers(dest="command")
    worker = commands.add_parser("arq-worker", help="run the baseline's ARQ worker (used by run)")
    worker.add_argument("--redis-url", required=True)
    args = parser.parse_args(argv)
    if args.command == "arq-worker":
        _serve_arq(redis_url=args.redis_url)
        return
    sizes = (
        None
        if args.quick
        else Sizes(tasks=args.tasks, per_request=FULL.per_request, runs=args.runs)
    )
    figures = run(quick=args.quick, code_dir=args.code_dir, sizes=sizes)
    print(render(figures))
    print(f"\n{summary(figures)}")


if __name__ == "__main__":
    main()
