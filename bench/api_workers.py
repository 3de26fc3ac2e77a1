"""``python -m bench.api_workers``: single submissions per second from 1 and 2 API processes.

``python -m api`` with ``API_WORKERS=1`` and with ``API_WORKERS=2`` (both running, one
private Redis), on PostgreSQL when ``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL`` is set
and on a SQLite file (for information: every process's commits take the file's one write
lock in turn). The load is ``bench.intake``'s: keep-alive connections each posting one
greeting at a time, from this process (uvloop), on the same 2 cores as the servers and
the database. Each run measures 1 then 2 processes (the order alternates between runs);
figures are medians over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from bench.figures import Figure, Target, median, render
from bench.intake import FULL, QUICK, Sizes, _api_env, _measure
from bench.processes import READY_TIMEOUT_S, free_port, migrate, module_process, postgres_database
from devtools.redis_server import start_redis_server

GREETING = "/api/v1/task/greeting"
PROCESSES = (1, 2)
# On PostgreSQL two processes beat one on this 2-core machine (issue 13).
SCALE_TARGET = Target(at_least=1.1, of_baseline=True)
INFORMATION = Target()


@contextmanager
def api_processes(env: Mapping[str, str], workers: int, log_path: Path) -> Iterator[int]:
    """``python -m api`` with ``API_WORKERS=workers``; yields its port once each process has
    started (every child's "startup complete" line) and it answers /healthz."""
    port = free_port()
    with (
        log_path.open("wb") as log,
        module_process(
            ["api"],
            {**env, "API_PORT": str(port), "API_WORKERS": str(workers), "LOG_LEVEL": "INFO"},
            output=log,
        ) as process,
    ):
        deadline = time.monotonic() + READY_TIMEOUT_S * 2
        while True:
            started = log_path.read_bytes().count(b"Application startup complete")
            if started >= workers:
                try:
                    answer = httpx.get(f"http://127.0.0.1:{port}/healthz", trust_env=False)
                    if answer.status_code == 200:
                        break
                except httpx.TransportError:
                    pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"API_WORKERS={workers} did not start: {log_path}")
            time.sleep(0.1)
        yield port


def measure_all(*, sizes: Sizes, connections: int) -> dict[str, list[float]]:
    """Submissions per second per run; keys like ``postgres/2``, ``sqlite/1``."""
    series: dict[str, list[float]] = {}
    greeting = {"name": "bench"}
    with (
        tempfile.TemporaryDirectory() as workdir_name,
        postgres_database("bench_api_workers") as postgres_url,
        contextlib.ExitStack() as servers,
    ):
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        servers.callback(redis.stop)
        databases: list[tuple[str, str]] = []
        if postgres_url is not None:
            databases.append(("postgres", postgres_url))
        sqlite_url = f"sqlite+aiosqlite:///{workdir}/bench.db"
        databases.append(("sqlite", sqlite_url))
        for label, url in databases:
            env = _api_env(url, redis.url, 8000)  # each server gets a port of its own
            if label == "sqlite":
                migrate(env)
            ports = {
                workers: servers.enter_context(
                    api_processes(env, workers, workdir / f"api-{label}-{workers}.log")
                )
                for workers in PROCESSES
            }
            for run in range(sizes.runs):
                order = PROCESSES if run % 2 == 0 else tuple(reversed(PROCESSES))
                for workers in order:
                    measured = _measure(
                        ports[workers],
                        path=GREETING,
                        body=greeting,
                        connections=connections,
                        sizes=sizes,
                    )
                    series.setdefault(f"{label}/{workers}", []).append(measured.per_s)
    return series


def figures_of(series: dict[str, list[float]], *, sizes: Sizes, connections: int) -> list[Figure]:
    runs = f"median of {sizes.runs}"
    figures: list[Figure] = []
    for label, name, target in (
        ("postgres", "PostgreSQL", SCALE_TARGET),
        ("sqlite", "SQLite", INFORMATION),
    ):
        if f"{label}/2" not in series:
            continue
        figures.append(
            Figure(
                name=f"Submit, {name}, API_WORKERS=2",
                value=median(series[f"{label}/2"]),
                unit="req/s",
                target=target,
                baseline=median(series[f"{label}/1"]),
                baseline_name="API_WORKERS=1",
                note=f"{connections} connections, each 202 committed, {runs}; 2 shared cores",
            )
        )
    return figures


def run(*, quick: bool, connections: int = 64) -> list[Figure]:
    """Measure 1 against 2 API processes (``make bench`` calls this)."""
    sizes = QUICK if quick else FULL
    series = measure_all(sizes=sizes, connections=connections)
    return figures_of(series, sizes=sizes, connections=connections)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=FULL.duration_s)
    parser.add_argument("--runs", type=int, default=FULL.runs)
    parser.add_argument("--connections", type=int, default=64)
    args = parser.parse_args()
    sizes = Sizes(duration_s=args.duration_s, warmup_s=FULL.warmup_s, runs=args.runs)
    series = measure_all(sizes=sizes, connections=args.connections)
    for key, values in series.items():
        print(f"{key:<11} per s: " + ", ".join(f"{value:,.0f}" for value in values))
    print(render(figures_of(series, sizes=sizes, connections=args.connections)))


if __name__ == "__main__":
    main()
