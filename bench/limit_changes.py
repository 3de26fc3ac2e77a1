"""``python -m bench.limit_changes``: limits changed at run time, two relays (issue 11).

A private stack (``python -m api``, two ``python -m relay``, no worker: jobs stay in ARQ)
on a fresh SQLite file drains a backlog while the API changes the limits:

- Rate: ``RELAY_RATE=500``; ``PUT /limits/cluster {"rate": "50/s"}`` mid-run, then
  ``{"rate": "500/s"}`` back. Figures: the worst 1-s window from 1 s after the first answer
  (target ≤ 51: 50·1 + burst 1), and the releases in the 2nd second after the raise (≥ 490).
- Pause: ``task:greeting`` and ``task:non_blocking_long_running_task`` at 100/s each;
  ``task:greeting`` paused for a few seconds. Figures: greetings released during the pause
  (from 1 s after its answer: tasks released before it may run up to the 0.5 s horizon
  later; target 0), and the other task's rate meanwhile (within 2 % of 100/s).

Each release is counted when ARQ could run its job (``bench.throttle.runnable_times_s``).
"""

from __future__ import annotations

import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from redis import Redis

from bench.figures import Figure, Target, max_in_window, render
from bench.processes import free_port, http_server, migrate, stack_env
from bench.relay import queued_jobs, relay_process
from bench.rows import fill_backlog
from bench.throttle import enqueue_times_s, queued_moments_s
from devtools.redis_server import start_redis_server

HIGH, LOW = 500, 50
OTHER_RATE = 100
POLL_S = 0.02


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    high_s: float  # how long the high rate runs before the PUT
    low_s: float  # how long the low rate runs
    pause_s: float


QUICK = Sizes(high_s=0.5, low_s=2.0, pause_s=2.0)
FULL = Sizes(high_s=3.0, low_s=6.0, pause_s=6.0)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Stack:
    http: httpx.Client
    redis: Redis
    database: Path
    env: Mapping[str, str]

    def start_relays(self, relays: ExitStack, workdir: Path) -> None:
        for index in range(2):
            log_path = workdir / f"relay-{index}.log"
            relays.enter_context(relay_process(self.env, log_path=log_path))


@contextmanager
def _stack(workdir: Path, **settings: str) -> Iterator[_Stack]:
    """The API on a fresh SQLite file and a private Redis (the caller starts the relays)."""
    redis = start_redis_server(workdir=workdir / "redis")
    client = Redis.from_url(redis.url)
    database = workdir / "limits.db"
    env: Mapping[str, str] = stack_env(
        database=database, redis_url=redis.url, port=free_port(), LOG_LEVEL="INFO", **settings
    )
    migrate(env)
    try:
        with ExitStack() as stack:
            base_url = stack.enter_context(http_server(["api"], env, int(env["API_PORT"])))
            http = stack.enter_context(httpx.Client(base_url=base_url, timeout=10))
            yield _Stack(http=http, redis=client, database=database, env=env)
    finally:
        client.close()
        redis.stop()


def _change(http: httpx.Client, method: str, path: str, body: object = None) -> float:
    answer = http.request(method, f"/api/v1{path}", json=body)
    answer.raise_for_status()
    return time.time()


def _wait(until: float) -> None:
    while time.time() < until:
        time.sleep(POLL_S)


def _times(database: Path, client: Redis) -> dict[str, float]:
    moments = queued_moments_s(database)
    enqueued = enqueue_times_s(client)
    return {task_id: max(moment, enqueued[task_id]) for task_id, moment in moments.items()}


def _rate_run(workdir: Path, sizes: Sizes) -> list[Figure]:
    backlog = round(HIGH * (sizes.high_s + 3.0) + LOW * sizes.low_s) + 500
    settings = {"RELAY_RATE": str(HIGH), "RELAY_BURST": "1"}
    with _stack(workdir, **settings) as stack, ExitStack() as relays:
        http, client, database = stack.http, stack.redis, stack.database
        fill_backlog(database, count=backlog)
        stack.start_relays(relays, workdir)
        _wait(time.time() + sizes.high_s)
        lowered_at = _change(http, "PUT", "/limits/cluster", {"rate": f"{LOW}/s"})
        _wait(lowered_at + sizes.low_s)
        raised_at = _change(http, "PUT", "/limits/cluster", {"rate": f"{HIGH}/s"})
        _wait(raised_at + 2.5)
        times = sorted(_times(database, client).values())
    slow = [t for t in times if lowered_at + 1.0 <= t <= raised_at]
    fast = [t for t in times if raised_at + 1.0 <= t <= raised_at + 2.0]
    return [
        Figure(
            name=f"Worst 1-s window after PUT {HIGH}/s → {LOW}/s",
            value=max_in_window(slow, 1.0),
            unit="tasks",
            target=Target(at_most=LOW + 1),
            note=f"two relays; from 1 s after the answer for {sizes.low_s - 1:.0f} s",
        ),
        Figure(
            name=f"Released in the 2nd second after PUT back to {HIGH}/s",
            value=len(fast),
            unit="tasks/s",
            target=Target(at_least=HIGH * 0.98),
            note="two relays",
        ),
    ]


def _pause_run(workdir: Path, sizes: Sizes) -> list[Figure]:
    other = "non_blocking_long_running_task"
    limits = f"task:greeting rate={OTHER_RATE}/s; task:{other} rate={OTHER_RATE}/s"
    per_kind = round(OTHER_RATE * (sizes.pause_s + 6.0))
    with _stack(workdir, RELAY_LIMITS=limits) as stack, ExitStack() as relays:
        http, client, database = stack.http, stack.redis, stack.database
        fill_backlog(database, count=per_kind, name="greeting")
        fill_backlog(database, count=per_kind, name=other)
        stack.start_relays(relays, workdir)
        while queued_jobs(client) < OTHER_RATE:
            time.sleep(POLL_S)
        _wait(time.time() + 1.0)
        paused_at = _change(http, "POST", "/limits/task:greeting/pause", {"for_s": 600})
        _wait(paused_at + sizes.pause_s)
        resumed_at = _change(http, "POST", "/limits/task:greeting/resume")
        _wait(resumed_at + 1.5)
        times = _times(database, client)
        with sqlite3.connect(database) as connection:
            names = dict(connection.execute("SELECT id, name FROM tasks").fetchall())
    start, end = paused_at + 1.0, resumed_at
    greetings = [t for task, t in times.items() if names[task] == "greeting" and start <= t <= end]
    first_second = sum(
        1 for task, t in times.items() if names[task] == "greeting" and paused_at <= t < start
    )
    others = sorted(t for task, t in times.items() if names[task] == other and start <= t <= end)
    rate = (len(others) - 1) / (others[-1] - others[0]) if len(others) > 1 else 0.0
    return [
        Figure(
            name="Paused scope's releases during a pause",
            value=len(greetings),
            unit="tasks",
            target=Target(at_most=0),
            note=f"task:greeting paused {sizes.pause_s - 1:.0f} s from 1 s after the answer; "
            f"{first_second} in that first second, released before it up to the horizon ahead",
        ),
        Figure(
            name="Another scope's rate during the pause",
            value=rate,
            unit="tasks/s",
            target=Target(at_least=0.98, at_most=1.02, of_baseline=True),
            baseline=OTHER_RATE,
            baseline_name="its rate",
            note=f"task:{other}, two relays",
        ),
    ]


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    figures = []
    for measure in (_rate_run, _pause_run):
        with tempfile.TemporaryDirectory() as workdir_name:
            figures += measure(Path(workdir_name), sizes)
    return figures


def main() -> None:
    print(render(run(quick="--quick" in sys.argv[1:])))


if __name__ == "__main__":
    main()
