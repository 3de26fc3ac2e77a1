"""``python -m bench.latency``: created_at to finished_at of greetings through the whole stack.

Starts a private Redis, a fresh SQLite file and the real ``python -m api``,
``python -m relay`` and ``python -m worker`` (defaults: unthrottled, SQLite
``synchronous=FULL``), then POSTs greetings at a steady 20 per second from this process
for a few windows, after one warm-up task has gone through every component (so the
figures are the steady state, not process start-up). Each task's latency is
``finished_at - created_at`` as the database records it (both stamped by our processes on
one clock); the figures are the medians over the windows of each window's p50 and p99.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import httpx

from bench.figures import Figure, Target, median, render
from bench.processes import ROOT, free_port, http_server, migrate
from devtools.redis_server import start_redis_server

RATE_PER_S = 20.0
GREETING = "/api/v1/task/greeting"
FINISH_TIMEOUT_S = 30.0
POLL_S = 0.05
# Issue 8's bounds, in steady state (after the warm-up task).
P50_TARGET = Target(at_most=20)
P99_TARGET = Target(at_most=50)


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    window_s: float
    windows: int


QUICK = Sizes(window_s=1.0, windows=1)
FULL = Sizes(window_s=8.0, windows=3)


@contextmanager
def component(name: str, env: Mapping[str, str], *, log_path: Path) -> Iterator[None]:
    """Run ``python -m NAME`` until the block ends (SIGTERM, then wait)."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", name], cwd=ROOT, env=dict(env), stdout=log, stderr=log
        )
    try:
        yield
    finally:
        process.terminate()
        process.wait(timeout=60)


def _submit(client: httpx.Client, base_url: str, name: str) -> str:
    answer = client.post(f"{base_url}{GREETING}", json={"name": name})
    answer.raise_for_status()
    task_id: str = answer.json()["task_id"]
    return task_id


def _finished(database: Path, task_ids: list[str]) -> dict[str, float]:
    """Latency in ms of each task already finished (succeeded or failed)."""
    marks = ",".join("?" * len(task_ids))
    with sqlite3.connect(database, timeout=30) as connection:
        rows = connection.execute(
            f"SELECT id, status, created_at, finished_at FROM tasks WHERE id IN ({marks}) "  # noqa: S608 - placeholders only
            "AND finished_at IS NOT NULL",
            task_ids,
        ).fetchall()
    latencies = {}
    for task_id, status, created_at, finished_at in rows:
        if status != "succeeded":
            raise RuntimeError(f"task {task_id} ended {status}")
        elapsed = datetime.fromisoformat(finished_at) - datetime.fromisoformat(created_at)
        latencies[task_id] = elapsed.total_seconds() * 1000
    return latencies


def _wait_finished(database: Path, task_ids: list[str]) -> list[float]:
    deadline = time.monotonic() + FINISH_TIMEOUT_S
    while True:
        done = _finished(database, task_ids)
        if len(done) == len(task_ids):
            return list(done.values())
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(task_ids) - len(done)} tasks unfinished")
        time.sleep(POLL_S)


def _steady(client: httpx.Client, base_url: str, *, duration_s: float) -> list[str]:
    """POST greetings at RATE_PER_S on a fixed schedule (not after each answer)."""
    interval_s = 1 / RATE_PER_S
    ids = []
    started = time.monotonic()
    for index in range(round(duration_s * RATE_PER_S)):
        delay_s = started + index * interval_s - time.monotonic()
        if delay_s > 0:
            time.sleep(delay_s)
        ids.append(_submit(client, base_url, f"n{index}"))
    return ids


def _percentile(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    p50: list[float] = []
    p99: list[float] = []
    with tempfile.TemporaryDirectory() as workdir_name, ExitStack() as stack:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        stack.callback(redis.stop)
        database = workdir / "latency.db"
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            "REDIS_URL": redis.url,
            "API_PORT": str(port),
            "API_KEYS": "",
            "RELAY_RATE": "0",
            "RELAY_LIMITS": "",
            "RELAY_MAX_INFLIGHT": "0",
        }
        migrate(env)
        base_url = stack.enter_context(http_server(["api"], env, port))
        stack.enter_context(component("relay", env, log_path=workdir / "relay.log"))
        stack.enter_context(component("worker", env, log_path=workdir / "worker.log"))
        client = stack.enter_context(httpx.Client(timeout=10.0, trust_env=False))
        # Warm-up: one task through every component (processes up, connections open).
        _wait_finished(database, [_submit(client, base_url, "warm-up")])
        for _ in range(sizes.windows):
            latencies = _wait_finished(
                database, _steady(client, base_url, duration_s=sizes.window_s)
            )
            p50.append(_percentile(latencies, 50))
            p99.append(_percentile(latencies, 99))
    tasks = round(sizes.window_s * RATE_PER_S)
    runs = f"median of {sizes.windows} windows" if sizes.windows > 1 else "1 window"
    note = (
        f"{RATE_PER_S:g} greetings/s, {tasks} per window, after a warm-up task, "
        f"api+relay+worker, SQLite, {runs}"
    )
    return [
        Figure(name="Latency p50", value=median(p50), unit="ms", target=P50_TARGET, note=note),
        Figure(name="Latency p99", value=median(p99), unit="ms", target=P99_TARGET, note=note),
    ]


def main() -> None:
    print(render(run(quick="--quick" in sys.argv[1:])))


if __name__ == "__main__":
    main()
