"""``python -m bench.metrics_scrape``: GET /metrics with 1,000,000 tasks stored.

Issue 12's bound: a scrape answers within 50 ms at the 99th percentile with 1,000,000
tasks in the table. For each database (PostgreSQL when ``BENCH_POSTGRES_URL`` or
``TEST_POSTGRES_URL`` is set): a fresh migrated database filled by
``bench.task_history``, the real ``python -m api`` with ``METRICS_REFRESH_S=1`` (so the
cached cluster view is refreshed in the background several times while it is measured,
as under a fast scraper), and one keep-alive client scraping one request after another.
Each answer is parsed with prometheus-client's parser and its task counts must add up to
the tasks seeded. The first scrape waits for the first view: reported on its own (the
cost of reading the cluster's view once). The figures are the medians over three rounds
of each round's p50 and p99, after an unmeasured warm-up.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.figures import Figure, Target, render
from bench.processes import migrate
from bench.sequential import FULL, QUICK, Sizes, api_on, medians_ms, on_both_databases
from bench.task_history import fill_postgres, fill_sqlite

PATH = "/metrics"
# Issue 12's bound.
P99_TARGET = Target(at_most=50)
INFORMATION = Target()
LIMITS = "task:* inflight=50; host:* rate=5/s; account:* inflight=100"


@dataclass(frozen=True, kw_only=True, slots=True)
class Measured:
    p50_ms: float
    p99_ms: float
    first_ms: float
    seed_s: float


def _tasks_counted(body: str) -> float:
    for family in text_string_to_metric_families(body):
        if family.name == "throttler_tasks":
            return sum(sample.value for sample in family.samples)
    raise RuntimeError("no throttler_tasks in the scrape")


def _scrape(client: httpx.Client, url: str, count: int, tasks: int) -> list[float]:
    times_s: list[float] = []
    for _ in range(count):
        started = time.perf_counter()
        answer = client.get(url)
        body = answer.text
        times_s.append(time.perf_counter() - started)
        if answer.status_code != 200:
            raise RuntimeError(f"{answer.status_code} {body[:200]}")
        if _tasks_counted(body) != tasks:
            raise RuntimeError(f"the scrape counts {_tasks_counted(body)} tasks, not {tasks}")
    return times_s


def _measure(database_url: str, redis_url: str, sizes: Sizes, seed_s: float) -> Measured:
    with (
        api_on(database_url, redis_url, RELAY_LIMITS=LIMITS, METRICS_REFRESH_S="1") as base_url,
        httpx.Client(timeout=60.0, trust_env=False) as client,
    ):
        url = f"{base_url}{PATH}"
        first = _scrape(client, url, 1, sizes.tasks)[0]
        p50, p99 = medians_ms(lambda count: _scrape(client, url, count, sizes.tasks), sizes)
    return Measured(p50_ms=p50, p99_ms=p99, first_ms=first * 1000, seed_s=seed_s)


def measure_sqlite(workdir: Path, redis_url: str, sizes: Sizes) -> Measured:
    path = workdir / "metrics.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrate({**os.environ, "DATABASE_URL": url})
    started = time.monotonic()
    fill_sqlite(path, count=sizes.tasks)
    return _measure(url, redis_url, sizes, time.monotonic() - started)


def measure_postgres(url: str, redis_url: str, sizes: Sizes) -> Measured:
    started = time.monotonic()
    fill_postgres(url, count=sizes.tasks)
    return _measure(url, redis_url, sizes, time.monotonic() - started)


def _figures(label: str, measured: Measured, sizes: Sizes) -> list[Figure]:
    note = (
        f"{sizes.tasks:,} tasks seeded in {measured.seed_s:.0f} s; METRICS_REFRESH_S=1, "
        f"{sizes.requests} sequential scrapes per round, median of {sizes.rounds}"
    )
    return [
        Figure(
            name=f"/metrics scrape p99, {label}",
            value=measured.p99_ms,
            unit="ms",
            target=P99_TARGET,
            note=note,
        ),
        Figure(
            name=f"/metrics scrape p50, {label}",
            value=measured.p50_ms,
            unit="ms",
            target=INFORMATION,
            note="the same scrapes",
        ),
        Figure(
            name=f"/metrics first scrape (reads the view), {label}",
            value=measured.first_ms,
            unit="ms",
            target=INFORMATION,
            note="what one background refresh of the cluster view costs",
        ),
    ]


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    return on_both_databases(
        "bench_metrics",
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
