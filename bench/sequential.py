"""Sequential requests to a real API over a table of 1,000,000 tasks: the shared harness.

``bench.task_list`` and ``bench.metrics_scrape`` both time one keep-alive client sending
one request after another to ``python -m api`` on a seeded database (``bench.task_history``)
and report the medians over rounds of each round's p50 and p99, after a warm-up.
"""

from __future__ import annotations

import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.figures import Figure, median
from bench.processes import free_port, http_server, postgres_database
from devtools.redis_server import start_redis_server


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    tasks: int
    requests: int  # per round
    rounds: int
    warmup: int


QUICK = Sizes(tasks=5_000, requests=50, rounds=1, warmup=10)
# Three rounds, the median of their percentiles: a p99 of one series on a shared 2-core
# machine measures the neighbours' bursts as much as the API.
FULL = Sizes(tasks=1_000_000, requests=700, rounds=3, warmup=100)

# ``count`` requests timed one by one, each duration in seconds.
Series = Callable[[int], list[float]]


def percentile(values: list[float], percent: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[percent - 1]


def medians_ms(series: Series, sizes: Sizes) -> tuple[float, float]:
    """The warm-up, then the medians over the rounds of each round's p50 and p99, in ms."""
    series(sizes.warmup)
    p50: list[float] = []
    p99: list[float] = []
    for _ in range(sizes.rounds):
        times_s = series(sizes.requests)
        p50.append(percentile(times_s, 50) * 1000)
        p99.append(percentile(times_s, 99) * 1000)
    return median(p50), median(p99)


@contextmanager
def api_on(database_url: str, redis_url: str, **settings: str) -> Iterator[str]:
    """A real ``python -m api`` on this database and Redis; yields its base URL."""
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "LOG_LEVEL": "WARNING",
        **settings,
    }
    with http_server(["api"], env, port) as base_url:
        yield base_url


def on_both_databases(
    database_name: str,
    sqlite: Callable[[Path, str], list[Figure]],
    postgres: Callable[[str, str], list[Figure]],
) -> list[Figure]:
    """Figures from a fresh SQLite file (``sqlite(workdir, redis_url)``) and, when a
    PostgreSQL server is configured, from a throwaway database on it (``postgres(url,
    redis_url)``), beside one private Redis."""
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as workdir_name, ExitStack() as stack:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        stack.callback(redis.stop)
        figures += sqlite(workdir, redis.url)
        with postgres_database(database_name) as postgres_url:
            if postgres_url is not None:
                figures += postgres(postgres_url, redis.url)
    return figures
