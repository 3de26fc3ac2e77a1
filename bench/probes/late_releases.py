"""``python -m bench.probes.late_releases``: do jobs reach ARQ after their release moment?

Issue 9, item 3: two relays on PostgreSQL at ``RELAY_RATE=3000 RELAY_BURST=1`` on a
loaded machine handed some jobs to Redis after the moment their token fell due; ARQ then
ran them at once, bunched, and a 1-s window held more releases than rate·T + burst.

The probe starts a private Redis, a fresh PostgreSQL database (``BENCH_POSTGRES_URL`` or
``TEST_POSTGRES_URL``), ``--burners`` CPU-bound processes (the load: the machine's API,
workers and databases in the issue's set-up) and ``--relays`` relays from ``--code-dir``;
commits the backlog in one transaction and waits until ARQ's queue holds every job. No
worker runs, so every job stays in Redis to be measured, from Redis alone:

- its score (the moment ARQ may start it);
- when its enqueue ran in Redis: the job key's absolute expiry (``PEXPIRETIME``) less the
  expiry the enqueue set, ``score - enqueue_time + expires_extra_ms`` (ARQ's rule; the
  enqueue time is in the job);
- so its runnable moment: the later of the two.

It prints how many jobs reached Redis after their score, the worst lateness, and the
most runnable moments in any 1-s window against the bound rate + burst.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

from arq.constants import job_key_prefix
from arq.jobs import deserialize_job_raw
from redis import Redis
from sqlalchemy import insert
from sqlalchemy.ext.asyncio import create_async_engine

from bench.processes import READY_TIMEOUT_S, ROOT, module_process, postgres_database
from bench.relay import QUEUE
from devtools.redis_server import start_redis_server
from throttler.models import OutboxEntry, Task, TaskEvent

# ARQ's default, which the relay's pool keeps.
EXPIRES_EXTRA_MS = 86_400_000
WINDOW_MS = 1000
# Shorter windows too: a batch that became runnable at once breaks the bound at 10 ms
# long before it shows in a whole second.
SHORT_WINDOWS_MS = (10, 100)
POLL_S = 0.1
INSERT_CHUNK = 5_000
# With --pause-s: how long after the backlog's commit the first relay is stopped.
PAUSE_AFTER_S = 2.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Arrival:
    reached_ms: int
    score_ms: int

    @property
    def runnable_ms(self) -> int:
        return max(self.reached_ms, self.score_ms)


@dataclass(frozen=True, kw_only=True, slots=True)
class Figures:
    jobs: int
    late: int
    worst_late_ms: int
    worst_window: int
    bound: int
    # Per shorter window: (length in ms, most runnable moments in one, the bound).
    short_windows: tuple[tuple[int, int, float], ...]
    span_s: float
    retimed: int


def worst_window(moments_ms: Sequence[int], *, window_ms: int = WINDOW_MS) -> int:
    """The most moments in any half-open window ``[t, t + window_ms)``."""
    ordered = sorted(moments_ms)
    most, start = 0, 0
    for end, moment in enumerate(ordered):
        while ordered[start] <= moment - window_ms:
            start += 1
        most = max(most, end - start + 1)
    return most


def _fill_backlog(database_url: str, *, count: int) -> None:
    """Commit ``count`` pending tasks with their outbox rows and events, in one transaction."""

    async def fill() -> None:
        engine = create_async_engine(database_url)
        start = datetime.now(UTC)
        tasks = [
            {
                "id": str(uuid.uuid4()),
                "name": "greeting",
                "account": "default",
                "payload": {"name": f"n{index}"},
                "status": "pending",
                "priority": 5,
                "attempts": 0,
                "created_at": start + timedelta(microseconds=index),
            }
            for index in range(count)
        ]
        try:
            async with engine.begin() as connection:
                for at in range(0, count, INSERT_CHUNK):
                    chunk = tasks[at : at + INSERT_CHUNK]
                    await connection.execute(insert(Task), chunk)
                    await connection.execute(
                        insert(OutboxEntry),
                        [{"task_id": t["id"], "created_at": t["created_at"]} for t in chunk],
                    )
                    await connection.execute(
                        insert(TaskEvent),
                        [
                            {
                                "task_id": t["id"],
                                "at": t["created_at"],
                                "event": "submitted",
                                "detail": {"account": "default"},
                            }
                            for t in chunk
                        ],
                    )
        finally:
            await engine.dispose()

    asyncio.run(fill())


def arrivals(client: Redis) -> list[Arrival]:
    """Every queued job's arrival in Redis and score, read from Redis."""
    queued = cast(list[tuple[bytes, float]], client.zrange(QUEUE, 0, -1, withscores=True))
    found: list[Arrival] = []
    for at in range(0, len(queued), 1000):
        chunk = queued[at : at + 1000]
        pipe = client.pipeline(transaction=False)
        for job_id, _ in chunk:
            key = job_key_prefix + job_id.decode()
            pipe.get(key)
            pipe.pexpiretime(key)
        replies = pipe.execute()
        for index, (_, score) in enumerate(chunk):
            payload, expires_at_ms = replies[2 * index], replies[2 * index + 1]
            enqueue_time_ms = deserialize_job_raw(payload)[4]
            score_ms = int(score)
            ttl_ms = score_ms - enqueue_time_ms + EXPIRES_EXTRA_MS
            found.append(Arrival(reached_ms=int(expires_at_ms) - ttl_ms, score_ms=score_ms))
    return found


@contextmanager
def _relay(
    env: dict[str, str], *, log_path: Path, code_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m relay`` from ``code_dir`` until the block ends, once it has started."""
    with (
        log_path.open("wb") as log,
        module_process(["relay"], env, output=log, code_dir=code_dir) as process,
    ):
        deadline = time.monotonic() + READY_TIMEOUT_S
        while b"relay.started" not in log_path.read_bytes():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.05)
        yield process


@contextmanager
def burners(count: int) -> Iterator[None]:
    """``count`` processes spinning on the CPU until the block ends."""
    spinning = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for process in spinning:
            process.kill()
            process.wait()


def measure(
    *,
    jobs: int,
    relays: int,
    rate: float,
    burst: int,
    load: int,
    code_dir: Path,
    pause_s: float = 0.0,
) -> Figures:
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        database_url = stack.enter_context(postgres_database("late", code_dir=code_dir))
        if database_url is None:
            raise SystemExit("set BENCH_POSTGRES_URL or TEST_POSTGRES_URL (a PostgreSQL server)")
        redis = start_redis_server(workdir=workdir)
        stack.callback(redis.stop)
        client = Redis.from_url(redis.url)
        stack.callback(client.close)
        env = {
            **os.environ,
            "DATABASE_URL": database_url,
            "REDIS_URL": redis.url,
            "RELAY_RATE": f"{rate:g}",
            "RELAY_BURST": str(burst),
            "RELAY_LIMITS": "",
            "RELAY_MAX_INFLIGHT": "0",
            "LOG_LEVEL": "INFO",
        }
        logs = [workdir / f"relay-{index}.log" for index in range(relays)]
        started = [
            stack.enter_context(_relay(env, log_path=log_path, code_dir=code_dir))
            for log_path in logs
        ]
        stack.enter_context(burners(load))
        _fill_backlog(database_url, count=jobs)
        if pause_s:
            # A relay stopped wherever it is (mid-handover, most likely) and resumed.
            time.sleep(PAUSE_AFTER_S)
            started[0].send_signal(signal.SIGSTOP)
            time.sleep(pause_s)
            started[0].send_signal(signal.SIGCONT)
        deadline = time.monotonic() + jobs / rate * 4 + 120
        while cast(int, client.zcard(QUEUE)) < jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{client.zcard(QUEUE)} of {jobs} jobs reached ARQ")
            time.sleep(POLL_S)
        found = arrivals(client)
        retimed = sum(
            int(count)
            for log_path in logs
            for count in re.findall(r"retimed=(\d+)", log_path.read_text())
        )
    late = [a for a in found if a.reached_ms > a.score_ms]
    runnable = [a.runnable_ms for a in found]
    return Figures(
        jobs=len(found),
        late=len(late),
        worst_late_ms=max((a.reached_ms - a.score_ms for a in late), default=0),
        worst_window=worst_window(runnable),
        bound=int(rate * WINDOW_MS / 1000 + burst),
        short_windows=tuple(
            (length, worst_window(runnable, window_ms=length), rate * length / 1000 + burst)
            for length in SHORT_WINDOWS_MS
        ),
        span_s=(max(runnable) - min(runnable)) / 1000,
        retimed=retimed,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--jobs", type=int, default=30_000)
    parser.add_argument("--relays", type=int, default=2)
    parser.add_argument("--rate", type=float, default=3000.0)
    parser.add_argument("--burst", type=int, default=1)
    parser.add_argument("--burners", type=int, default=4, help="CPU-bound processes (the load)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument(
        "--pause-s",
        type=float,
        default=0.0,
        help=f"SIGSTOP the first relay {PAUSE_AFTER_S:g} s into the drain for this long",
    )
    parser.add_argument(
        "--code-dir",
        type=Path,
        default=ROOT,
        help="run the relays and the migrations from this checkout (default: this one)",
    )
    args = parser.parse_args(argv)
    print(
        f"{args.relays} relays from {args.code_dir}, PostgreSQL, RELAY_RATE={args.rate:g} "
        f"RELAY_BURST={args.burst}, {args.burners} CPU burners, {args.jobs} jobs, "
        f"pause {args.pause_s:g} s, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    for run in range(args.runs):
        figures = measure(
            jobs=args.jobs,
            relays=args.relays,
            rate=args.rate,
            burst=args.burst,
            load=args.burners,
            code_dir=args.code_dir,
            pause_s=args.pause_s,
        )
        print(
            f"run {run + 1}: {figures.late} of {figures.jobs} jobs reached Redis after their "
            f"score (worst {figures.worst_late_ms} ms late); worst {WINDOW_MS} ms window of "
            f"runnable moments {figures.worst_window} (bound {figures.bound}); "
            + "".join(
                f"{ms} ms: {most} (bound {bound:g}); " for ms, most, bound in figures.short_windows
            )
            + f"{figures.jobs / figures.span_s:.0f} jobs/s over {figures.span_s:.1f} s; "
            f"retimed (relay logs) {figures.retimed}"
        )


if __name__ == "__main__":
    main()
