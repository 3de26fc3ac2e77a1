"""A relay process's own metrics: claims and releases into ARQ.

One registry per process (``REGISTRY``), served on ``RELAY_METRICS_PORT`` when set
(``serve_metrics``); in-process relays (the tests) share it, so read differences. The
``task`` label is a task name from the catalog, never free text: bounded.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, start_http_server

REGISTRY = CollectorRegistry()

CLAIMS = Counter(
    "throttler_relay_claims",
    "Claim transactions this relay ran (each leases what the limits admit, maybe nothing).",
    registry=REGISTRY,
)
RELEASED = Counter(
    "throttler_relay_released",
    "Tasks this relay handed to ARQ, by task name.",
    ["task"],
    registry=REGISTRY,
)
LATE = Counter(
    "throttler_relay_late",
    "Tasks still late after every retime: left leased, released again once the lease lapses.",
    registry=REGISTRY,
)
HELD_BACK = Counter(
    "throttler_relay_held_back",
    "Claimed rows a claim left in the outbox, by reason: cap (an in-flight cap or the queue "
    "room) or rate (no token yet). A row held back by several claims counts each time.",
    ["reason"],
    registry=REGISTRY,
)
ENQUEUE_FAILURES = Counter(
    "throttler_relay_enqueue_failures",
    "Enqueues into ARQ that failed (the rows stay in the outbox and are claimed again).",
    registry=REGISTRY,
)


def serve_metrics(port: int, *, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped by Prometheus
    """Serve ``REGISTRY`` on ``port`` from a daemon thread; 0 leaves it off."""
    if port:
        start_http_server(port, addr=addr, registry=REGISTRY)
