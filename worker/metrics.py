"""A worker process's own metrics: attempts by task name and outcome, queue wait, run time.

One registry per process (``REGISTRY``), served on ``WORKER_METRICS_PORT`` when set
(``serve_metrics``); in-process workers (the tests) share it, so read differences. Task
names come from the worker's code, never from a request: the ``task`` label is bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

REGISTRY = CollectorRegistry()

ATTEMPTS_STARTED = Counter(
    "throttler_worker_attempts_started",
    "Attempts this worker started, by task name.",
    ["task"],
    registry=REGISTRY,
)
ATTEMPTS_FINISHED = Counter(
    "throttler_worker_attempts_finished",
    "Attempts this worker recorded an outcome for, by task name and outcome "
    "(succeeded, failed, retrying, requeued).",
    ["task", "outcome"],
    registry=REGISTRY,
)
QUEUE_WAIT = Histogram(
    "throttler_worker_queue_wait_seconds",
    "From the moment a job was due in ARQ to its attempt's start, by task name.",
    ["task"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RUN_TIME = Histogram(
    "throttler_worker_run_seconds",
    "From an attempt's start to its recorded outcome, by task name.",
    ["task"],
    registry=REGISTRY,
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600),
)


def serve_metrics(port: int, *, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped by Prometheus
    """Serve ``REGISTRY`` on ``port`` from a daemon thread; 0 leaves it off."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
