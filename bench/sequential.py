"""Sequential requests to a real API over a table of 1,000,000 tasks: the shared harness.

``bench.task_list`` and ``bench.metrics_scrape`` both time one keep-alive client sending
one request after another to ``python -m api`` on a seeded database (``bench.task_history``)
and report the medians over rounds of each round's p50 and p99, after a warm-up.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from bench.figures import median
from bench.processes import free_port, http_server


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    tasks: int
    requests: int  # per round
    rounds: int
    warmup: int


QUICK = Sizes(tasks=20_000, requests=50, rounds=1, warmup=10)
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
