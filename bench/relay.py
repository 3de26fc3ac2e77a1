"""``python -m bench.relay``: how fast ``python -m relay`` drains a backlog into ARQ.

Each run, against a private Redis and a fresh SQLite file (``RELAY_RATE=0``):

- baseline: this process enqueues jobs with a plain ``await enqueue_job(...)`` loop;
- the relay: ``python -m relay`` is started and idle, then one transaction commits the
  backlog (tasks, outbox rows, ``submitted`` events); timed from that commit until ARQ's
  queue holds every job;
- the same with 1,000,000 finished tasks and their 4,000,000 events in the tables;
- the relay's peak RSS (``VmHWM``) over both.

The million-row file is built once and kept in the temporary directory (keyed by the
schema), since building it takes longer than the runs; each run deletes what the
previous one added.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from arq.connections import RedisSettings, create_pool
from redis import Redis

from bench.figures import Figure, Target, median, render
from bench.processes import READY_TIMEOUT_S, migrate, module_process
from bench.rows import connect, fill_backlog, fill_finished
from devtools.redis_server import RedisServer, start_redis_server

QUEUE = "arq:queue"
DRAIN_TIMEOUT_S = 60.0
POLL_S = 0.005
CACHE_DIR = Path(tempfile.gettempdir()) / "arq-throttler-bench"
BATCH_SIZE = 1000
# Issue 8: the relay hands jobs to ARQ at least 4 times as fast as ARQ's own way in.
RELAY_TARGET = Target(at_least=4.0, of_baseline=True)


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    backlog: int
    baseline_jobs: int
    finished: int
    runs: int


QUICK = Sizes(backlog=1_000, baseline_jobs=1_000, finished=5_000, runs=1)
FULL = Sizes(backlog=50_000, baseline_jobs=10_000, finished=1_000_000, runs=3)


@dataclass(frozen=True, kw_only=True, slots=True)
class Drain:
    tasks_per_s: float
    peak_rss_mb: float


async def _enqueue_loop(redis_url: str, *, jobs: int, prefix: str) -> float:
    """Jobs per second of a plain ``enqueue_job`` loop: ARQ's own way in."""
    pool = await create_pool(RedisSettings.from_dsn(redis_url))
    try:
        started = time.perf_counter()
        for index in range(jobs):
            await pool.enqueue_job("greeting", _job_id=f"{prefix}-{index}", _queue_name=QUEUE)
        return jobs / (time.perf_counter() - started)
    finally:
        await pool.aclose()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextmanager
def relay_process(env: Mapping[str, str], *, log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m relay`` until the block ends; yield it once it logged its start."""
    with log_path.open("wb") as log, module_process(["relay"], env, output=log) as process:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"relay.started" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield process


def queued_jobs(client: Redis) -> int:
    """Jobs in ARQ's queue (deferred ones included)."""
    return cast(int, client.zcard(QUEUE))


def _drain(database: Path, *, redis: RedisServer, backlog: int, log_path: Path) -> Drain:
    """Start the relay, commit the backlog, and time it into ARQ's queue."""
    client = Redis.from_url(redis.url)
    client.flushall()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "REDIS_URL": redis.url,
        "RELAY_RATE": "0",
        # Claims of 1,000 rows: each claim transaction costs about the same whatever its
        # size, so the default 100 spends most of the time on per-claim overhead.
        "RELAY_BATCH_SIZE": str(BATCH_SIZE),
        "RELAY_LIMITS": "",
        "RELAY_MAX_INFLIGHT": "0",
        "LOG_LEVEL": "INFO",
    }
    try:
        with relay_process(env, log_path=log_path) as process:
            fill_backlog(database, count=backlog)
            committed = time.perf_counter()
            deadline = time.monotonic() + DRAIN_TIMEOUT_S
            while (queued := queued_jobs(client)) < backlog:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay drained {queued} of {backlog}")
                time.sleep(POLL_S)
            elapsed_s = time.perf_counter() - committed
            peak_mb = _peak_rss_mb(process.pid)
    finally:
        client.close()
    return Drain(tasks_per_s=backlog / elapsed_s, peak_rss_mb=peak_mb)


def _schema_key(template: Path) -> str:
    with sqlite3.connect(template) as connection:
        schema = "".join(
            row[0] or ""
            for row in connection.execute("SELECT sql FROM sqlite_master ORDER BY name")
        )
    return hashlib.sha256(schema.encode()).hexdigest()[:12]


def _history(template: Path, *, finished: int) -> Path:
    """A migrated file holding ``finished`` finished tasks: built once, then reused."""
    CACHE_DIR.mkdir(exist_ok=True)
    path = CACHE_DIR / f"finished-{finished}-{_schema_key(template)}.db"
    if not path.exists():
        building = path.with_suffix(".building")
        shutil.copyfile(template, building)
        fill_finished(building, count=finished)
        building.rename(path)
    return path


def _forget_runs(path: Path) -> None:
    """Delete what a run added (pending or queued tasks, with their rows), keep the history."""
    connection = connect(path)
    try:
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("DELETE FROM tasks WHERE status != 'succeeded'")
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        connection.close()


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    baseline: list[float] = []
    empty: list[float] = []
    full: list[float] = []
    peak_mb: list[float] = []
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        try:
            template = workdir / "template.db"
            migrate({**os.environ, "DATABASE_URL": f"sqlite+aiosqlite:///{template}"})
            history = _history(template, finished=sizes.finished)
            for index in range(sizes.runs):
                Redis.from_url(redis.url).flushall()
                baseline.append(
                    asyncio.run(
                        _enqueue_loop(redis.url, jobs=sizes.baseline_jobs, prefix=f"b{index}")
                    )
                )
                database = workdir / f"empty-{index}.db"
                shutil.copyfile(template, database)
                drained = _drain(
                    database, redis=redis, backlog=sizes.backlog, log_path=workdir / "relay.log"
                )
                empty.append(drained.tasks_per_s)
                peak_mb.append(drained.peak_rss_mb)
                _forget_runs(history)
                drained = _drain(
                    history, redis=redis, backlog=sizes.backlog, log_path=workdir / "relay.log"
                )
                full.append(drained.tasks_per_s)
                peak_mb.append(drained.peak_rss_mb)
            _forget_runs(history)
        finally:
            redis.stop()
    runs = f"median of {sizes.runs}" if sizes.runs > 1 else "1 run"
    backlog = f"{sizes.backlog:,}"
    return [
        Figure(
            name=f"Relay, {sizes.backlog // 1000}k backlog",
            value=median(empty),
            unit="tasks/s",
            target=RELAY_TARGET,
            baseline=median(baseline),
            baseline_name="enqueue_job loop",
            note=f"{backlog} tasks, RELAY_RATE=0 RELAY_BATCH_SIZE={BATCH_SIZE}, SQLite, {runs}",
        ),
        Figure(
            name=f"Relay with {sizes.finished:,} finished rows",
            value=median(full),
            unit="tasks/s",
            target=Target(at_least=0.9, of_baseline=True),
            baseline=median(empty),
            baseline_name="empty tables",
            note=f"{backlog} tasks, plus {4 * sizes.finished:,} events, {runs}",
        ),
        Figure(
            name="Relay memory",
            value=max(peak_mb),
            unit="MB",
            target=Target(at_most=150),
            note="peak RSS of python -m relay over every run",
        ),
    ]


def main() -> None:
    print(render(run(quick="--quick" in sys.argv[1:])))


if __name__ == "__main__":
    main()
