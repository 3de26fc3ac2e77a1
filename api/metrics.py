"""GET /metrics: the cluster's view (cached, api.cluster_view) and the API's own requests.

Each app has its own ``CollectorRegistry``, so two apps in one process (the tests) never
share or collide on a series. /metrics is open, like /healthz: Prometheus scrapers carry
no API key; it exposes counts and limits, never a task, payload or account key (README,
"Metrics").
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.cluster_view import ClusterView, ClusterViewCache

METRICS_PATH = "/metrics"
# A request no route matched: one series for all of them, whatever the path.
UNMATCHED_ROUTE = "unmatched"


class ClusterCollector(Collector):
    """Exposes the cache's last ``ClusterView``; collecting never touches a database."""

    def __init__(self, cache: ClusterViewCache) -> None:
        self._cache = cache

    def describe(self) -> Iterable[Metric]:
        # Nothing at registration: the families depend on the view read later.
        return []

    def collect(self) -> Iterable[Metric]:
        view = self._cache.view
        if view is None:
            return []
        return _families(view)


def _gauge(name: str, doc: str, value: float | None) -> list[Metric]:
    if value is None:
        return []
    return [GaugeMetricFamily(name, doc, value=value)]


def _families(view: ClusterView) -> list[Metric]:
    tasks = GaugeMetricFamily("throttler_tasks", "Tasks by status.", labels=["status"])
    for status, count in sorted(view.tasks_by_status.items()):
        tasks.add_metric([status], count)
    backlog = GaugeMetricFamily(
        "throttler_scope_backlog", "Pending tasks per limited scope.", labels=["scope"]
    )
    inflight = GaugeMetricFamily(
        "throttler_scope_inflight", "Queued or running tasks per limited scope.", labels=["scope"]
    )
    dispatched = GaugeMetricFamily(
        "throttler_scope_dispatched_last_minute",
        "Tasks relayed to ARQ in the last 60 seconds per limited scope.",
        labels=["scope"],
    )
    cap = GaugeMetricFamily(
        "throttler_scope_inflight_cap", "The in-flight cap in force per scope.", labels=["scope"]
    )
    rate = GaugeMetricFamily(
        "throttler_scope_rate_cap_per_second",
        "The release rate cap in force per scope (tasks per second).",
        labels=["scope"],
    )
    paused = GaugeMetricFamily(
        "throttler_scope_paused_until_timestamp_seconds",
        "When the pause of a paused scope ends (Unix time); absent: not paused.",
        labels=["scope"],
    )
    for scope, until in sorted(view.paused.items()):
        paused.add_metric([scope], until)
    for sample in view.scopes:
        backlog.add_metric([sample.scope], sample.backlog)
        inflight.add_metric([sample.scope], sample.inflight)
        dispatched.add_metric([sample.scope], sample.dispatched_last_minute)
        if sample.inflight_cap is not None:
            cap.add_metric([sample.scope], sample.inflight_cap)
        if sample.rate_per_s is not None:
            rate.add_metric([sample.scope], sample.rate_per_s)
    return [
        tasks,
        *_gauge("throttler_outbox_backlog", "Tasks waiting in the outbox.", view.outbox_backlog),
        *_gauge(
            "throttler_outbox_oldest_age_seconds",
            "Age of the oldest outbox entry (0 when empty).",
            view.outbox_oldest_age_s,
        ),
        backlog,
        inflight,
        dispatched,
        cap,
        rate,
        paused,
        *_gauge("throttler_relays_alive", "Relays heartbeating now.", view.relays_alive),
        *_gauge("throttler_workers_alive", "Workers heartbeating now.", view.workers_alive),
        *_gauge(
            "throttler_workers_running_jobs",
            "Jobs running on live workers, as of their last heartbeat.",
            view.workers_running,
        ),
        *_gauge(
            "throttler_cluster_view_age_seconds",
            "How old the cluster view above is (METRICS_REFRESH_S bounds it while scraped).",
            max(0.0, time.time() - view.read_at),
        ),
    ]


class ApiMetrics:
    """The API's request counter and latency histogram, in the app's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "throttler_api_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "throttler_api_request_duration_seconds",
            "Time to answer an HTTP request, by method and route template.",
            ["method", "route"],
            registry=registry,
        )
        # Labelled children by key: .labels() costs more than the observation itself.
        self._counters: dict[tuple[str, str, str], Any] = {}
        self._histograms: dict[tuple[str, str], Any] = {}

    def observe(self, method: str, route: str, code: int, seconds: float) -> None:
        key = (method, route)
        histogram = self._histograms.get(key)
        if histogram is None:
            histogram = self._histograms[key] = self.latency.labels(method, route)
        histogram.observe(seconds)
        counter_key = (method, route, str(code))
        counter = self._counters.get(counter_key)
        if counter is None:
            counter = self._counters[counter_key] = self.requests.labels(*counter_key)
        counter.inc()


class RequestMetricsMiddleware:
    """Counts and times every HTTP request, labelled by the route template it matched.

    Pure ASGI and outermost, so it sees the fast path's submits too (api.fast_path serves
    them inside their route) for a dictionary lookup and two observations each. The route
    label is the template (``/api/v1/tasks/{task_id}``), never the path: bounded.
    """

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        code = 500

        async def send_status(message: Message) -> None:
            nonlocal code
            if message["type"] == "http.response.start":
                code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or UNMATCHED_ROUTE
            self.metrics.observe(scope["method"], template, code, time.perf_counter() - started)


router = APIRouter(tags=["health"])


@router.get(
    METRICS_PATH,
    name="metrics",
    operation_id="metrics",
    summary="Prometheus metrics: the cluster's view (cached) and this API's requests.",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Text format."}},
)
async def get_metrics(request: Request) -> Response:
    await request.app.state.cluster_view.current()
    body = generate_latest(request.app.state.metrics_registry)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
