"""Build the FastAPI application; its lifespan owns the engine, the intake writer and Redis."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from api.announce import NewWorkAnnouncer
from api.body_limit import BodyLimitMiddleware
from api.bulk import BULK_MAX_BODY_BYTES, BULK_PATH
from api.cluster_view import ClusterReader, ClusterViewCache
from api.dashboard.routes import mount_dashboard
from api.dashboard.summary import Dashboard
from api.docs import mount_docs
from api.errors import register_error_handlers
from api.intake import IntakeWriter
from api.key_first import KeyBeforeBodyMiddleware
from api.metrics import ApiMetrics, ClusterCollector, RequestMetricsMiddleware
from api.metrics import router as metrics_router
from api.routes import cancel, health, limits, nodes, relay, tasks
from api.waiters import FinishedListener, FinishedSweep, Waiters
from throttler.constants import API_PREFIX
from throttler.db import create_engine
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.redis_conn import RedisMisconfigured, check_redis, redis_client
from throttler.settings import Settings
from throttler.store import open_store
from throttler.store.limits import LimitStore

log = logging.getLogger(__name__)

# Redis is only pinged by /readyz; a dead server must not hold the probe for long.
REDIS_TIMEOUT_S = 2.0
# An idle pub/sub connection is pinged this often, so a silently dead one is replaced.
SUBSCRIBER_HEALTH_CHECK_S = 10


def fastapi_telemetry() -> dict[str, Any]:
    """FastAPI's own OpenTelemetry hooks: off unless an OpenTelemetry SDK is installed.

    FastAPI (0.16x) depends on ``opentelemetry-api`` alone and, per request, looks up the
    global tracer and meter providers (environment reads included) and wraps the app in
    its telemetry middleware: about 8 % of the API's CPU per submit, for spans that go
    nowhere until an SDK and an exporter are installed. With ``opentelemetry-sdk``
    installed, FastAPI's defaults (and its ``FASTAPI_OTEL_*`` settings) apply unchanged.
    """
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}  # a FastAPI without native telemetry
    if importlib.util.find_spec("opentelemetry.sdk") is not None:
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app(settings: Settings) -> FastAPI:
    """Return the API serving ``settings``; resources open and close with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        redis = redis_client(
            settings, connect_timeout_s=REDIS_TIMEOUT_S, socket_timeout_s=REDIS_TIMEOUT_S
        )
        # A refused password or certificate stops the start; Redis merely away does not
        # (submissions go to the database; /readyz says Redis is down).
        try:
            await check_redis(redis, settings)
        except RedisMisconfigured as error:
            log.error("api.redis_misconfigured", extra=fields(error=str(error)))  # noqa: TRY400 - one line, no traceback
            await redis.aclose()
            await engine.dispose()
            raise
        except REDIS_ERRORS as error:
            log.warning("api.redis_unavailable", extra=fields(error=repr(error)))
        app.state.engine = engine
        store = open_store(settings, engine)
        app.state.reads = store.reads
        app.state.retries = store.retries
        app.state.cancels = store.cancels
        app.state.limits = LimitStore(engine)
        app.state.redis = redis
        announcer = NewWorkAnnouncer(redis)
        app.state.announcer = announcer
        intake = IntakeWriter(store.intake, announcer=announcer)
        intake.start()
        app.state.intake = intake
        # Long-polls: one subscription and one periodic query serve every waiter.
        waiters = Waiters()
        subscriber = redis_client(
            settings,
            connect_timeout_s=REDIS_TIMEOUT_S,
            socket_timeout_s=REDIS_TIMEOUT_S,
            health_check_interval_s=SUBSCRIBER_HEALTH_CHECK_S,
        )
        listener = FinishedListener(redis=subscriber, waiters=waiters)
        sweep = FinishedSweep(reads=app.state.reads, waiters=waiters)
        app.state.waiters = waiters
        cluster_view = ClusterViewCache(
            ClusterReader(
                settings=settings,
                reads=app.state.reads,
                monitoring=store.monitoring,
                limits=app.state.limits,
                redis=redis,
            ),
            max_age_s=settings.metrics_refresh_s,
        )
        app.state.cluster_view = cluster_view
        dashboard = Dashboard(
            settings=settings,
            reads=app.state.reads,
            monitoring=store.monitoring,
            limits=app.state.limits,
            redis=redis,
            cluster_view=cluster_view,
        )
        app.state.dashboard = dashboard
        collector = ClusterCollector(cluster_view)
        registry.register(collector)
        background = [asyncio.create_task(listener.run()), asyncio.create_task(sweep.run())]
        try:
            yield
        finally:
            listener.stop()
            sweep.stop()
            await dashboard.close()
            await cluster_view.close()
            registry.unregister(collector)
            for job in background:
                job.cancel()
            for outcome in await asyncio.gather(*background, return_exceptions=True):
                if isinstance(outcome, Exception):
                    log.error("waiters.crashed", extra=fields(error=repr(outcome)))
            await subscriber.aclose()
            # Write every submission already queued before the engine goes away.
            await intake.close()
            await announcer.close()
            await redis.aclose()
            await store.close()
            await engine.dispose()

    app = FastAPI(
        title="ARQ Task Throttler",
        summary="Durable task intake: accepted tasks are relayed to ARQ workers within limits.",
        version="1.0.0",
        lifespan=lifespan,
        # api.docs serves these instead: assets without a CDN, access by API_DOCS.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        **fastapi_telemetry(),
    )
    app.state.settings = settings
    # This app's own registry (api.metrics): two apps in one process never share a series.
    registry = CollectorRegistry()
    app.state.metrics_registry = registry
    mount_docs(app, settings)
    app.include_router(tasks.router)
    app.include_router(cancel.router)
    app.include_router(relay.router)
    app.include_router(limits.router)
    app.include_router(nodes.router)
    app.include_router(health.router)
    app.include_router(metrics_router)
    mount_dashboard(app)
    register_error_handlers(app)
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.api_max_body_bytes,
        path_limits={BULK_PATH: max(settings.api_max_body_bytes, BULK_MAX_BODY_BYTES)},
    )
    # Added last, so it runs first: a keyless body is refused before the limit reads it.
    app.add_middleware(
        KeyBeforeBodyMiddleware, accounts_by_key=settings.accounts_by_key, prefix=API_PREFIX
    )
    # Added last of all, so it is outermost: it times and counts every answer, refusals too.
    app.add_middleware(RequestMetricsMiddleware, metrics=ApiMetrics(registry))
    return app
