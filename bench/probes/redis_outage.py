"""Probe (issue 9, item 7): the worker through a Redis outage under a greeting load.

``python -m bench.probes.redis_outage [--code-dir DIR] [--outage-s 10]``. Runs a worker
from ``DIR`` on a fresh SQLite database and a private Redis; queues greetings (as the
relay does: a task row, then an ARQ job of its id) at a steady pace, plus a few
long-running tasks that are mid-run when Redis stops; stops Redis for ``--outage-s``
seconds, starts it again on the same port, queues ``PICKUP_PROBES`` greetings at once,
and prints:

- the worker's WARNING and ERROR lines from the outage on, by event (the Redis outage
  should be one ``worker.redis_unavailable`` and one ``worker.redis_restored``);
- how long after Redis answered again each of those greetings started (min-max).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import tempfile
import time
from collections import Counter
from contextlib import ExitStack
from pathlib import Path

from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import select

from bench.processes import ROOT, commit_of, migrate, module_process
from devtools.redis_server import free_port, start_redis_server
from tests.integration.worker_harness import enqueue, job_id_of, queue_task
from throttler.db import SessionFactory, create_engine, create_session_factory
from throttler.models import TaskEvent
from throttler.settings import Settings

LOAD_PACE_S = 0.1
BEFORE_S = 3.0
# Long-running tasks mid-run as Redis stops: their ARQ bookkeeping fails at the end.
JOBS_IN_OUTAGE = 40
PICKUP_PROBES = 5
START_TIMEOUT_S = 60.0
# A worker log line: time, level, component, event, fields.
_LINE = re.compile(r"^\S+ (?P<level>[A-Z]+) \S+ (?P<event>\S+)")


async def _queue(
    sessions: SessionFactory,
    pool: ArqRedis,
    settings: Settings,
    name: str,
    payload: dict[str, object],
) -> str:
    task_id = await queue_task(sessions, name=name, payload=payload)
    await enqueue(pool, settings, name=name, job_id=await job_id_of(sessions, task_id))
    return task_id


async def _load(sessions: SessionFactory, settings: Settings, seconds: float) -> None:
    pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    try:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await _queue(sessions, pool, settings, "greeting", {"name": "load"})
            await asyncio.sleep(LOAD_PACE_S)
    finally:
        await pool.aclose()


async def _started_at(sessions: SessionFactory, task_ids: list[str]) -> dict[str, float]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        async with sessions() as session:
            rows = await session.execute(
                select(TaskEvent.task_id, TaskEvent.at).where(
                    TaskEvent.task_id.in_(task_ids), TaskEvent.event == "started"
                )
            )
            started = {task_id: at.timestamp() for task_id, at in rows}
        if len(started) == len(task_ids) or time.monotonic() > deadline:
            return started
        await asyncio.sleep(0.05)


async def _logged(path: Path, line: str, *, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while line not in await asyncio.to_thread(path.read_text, errors="replace"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no {line!r} within {timeout_s:g} s")
        await asyncio.sleep(0.1)


async def _probe(*, code_dir: Path, outage_s: float, workdir: Path) -> None:
    port = free_port()
    database = workdir / "probe.db"
    settings = Settings(
        database_url=f"sqlite+aiosqlite:///{database}", redis_url=f"redis://127.0.0.1:{port}/0"
    )
    env = {
        **os.environ,
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "INFO",
    }
    migrate(env, code_dir=code_dir)
    engine = create_engine(settings)
    sessions = create_session_factory(engine)
    redis = start_redis_server(port=port, workdir=workdir / "redis")
    worker_log = workdir / "worker.log"
    try:
        with ExitStack() as stack:
            log = stack.enter_context(worker_log.open("wb"))
            stack.enter_context(module_process(["worker"], env, output=log, code_dir=code_dir))
            await _logged(worker_log, "worker.ready")
            await _load(sessions, settings, BEFORE_S)
            pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            for index in range(JOBS_IN_OUTAGE):
                # Ending one after another through the outage's first seconds.
                payload: dict[str, object] = {"duration": 1 + index % 5}
                await _queue(sessions, pool, settings, "non_blocking_long_running_task", payload)
            await pool.aclose()
            await asyncio.sleep(0.5)  # picked up and running
            before_outage = len(worker_log.read_bytes())
            redis.stop()
            await asyncio.sleep(outage_s)
            redis = start_redis_server(port=port, workdir=workdir / "redis")
            answering_at = time.time()
            pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            probes = [
                await _queue(sessions, pool, settings, "greeting", {"name": f"probe{i}"})
                for i in range(PICKUP_PROBES)
            ]
            await pool.aclose()
            started = await _started_at(sessions, probes)
            await _load(sessions, settings, 2.0)
    finally:
        redis.stop()
        await engine.dispose()

    lines = worker_log.read_bytes()[before_outage:].decode(errors="replace").splitlines()
    events: Counter[str] = Counter()
    for line in lines:
        match = _LINE.match(line)
        if match and match["level"] in ("WARNING", "ERROR", "CRITICAL"):
            events[match["event"]] += 1
        elif line.startswith("Traceback"):
            events["Traceback"] += 1
    pickups = sorted(at - answering_at for at in started.values())
    print(f"worker WARNING/ERROR lines from the outage on: {sum(events.values())}")
    for event, count in events.most_common(8):
        print(f"  {count:4d} {event}")
    missing = PICKUP_PROBES - len(pickups)
    span = f"{pickups[0]:.2f}-{pickups[-1]:.2f} s" if pickups else "none"
    print(
        f"greetings queued as Redis answered again: {PICKUP_PROBES}; started {span} after it"
        + (f"; {missing} not started within {START_TIMEOUT_S:g} s" if missing else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-dir", type=Path, default=ROOT, help="checkout to run")
    parser.add_argument("--outage-s", type=float, default=10.0, help="seconds without Redis")
    parser.add_argument("--workdir", type=Path, help="keep the logs here (default: a temp dir)")
    args = parser.parse_args()
    commit = commit_of(args.code_dir)
    print(f"code: {args.code_dir.resolve()} ({commit}); Redis stopped {args.outage_s:g} s")
    with ExitStack() as stack:
        workdir = args.workdir or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="probe-redis-"))
        )
        workdir.mkdir(parents=True, exist_ok=True)
        asyncio.run(_probe(code_dir=args.code_dir, outage_s=args.outage_s, workdir=workdir))


if __name__ == "__main__":
    main()
