"""Build the FastAPI application; its lifespan owns the engine and the Redis client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from redis.asyncio import Redis

from api.body_limit import BodyLimitMiddleware
from api.errors import register_error_handlers
from api.routes import health, relay, tasks
from throttler.db import create_engine, create_read_session_factory, create_session_factory
from throttler.settings import Settings

# Redis is only pinged by /readyz; a dead server must not hold the probe for long.
REDIS_TIMEOUT_S = 2.0


def create_app(settings: Settings) -> FastAPI:
    """Return the API serving ``settings``; resources open and close with its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_engine(settings)
        redis = Redis.from_url(
            settings.redis_url,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
        )
        app.state.engine = engine
        app.state.sessions = create_session_factory(engine)
        app.state.read_sessions = create_read_session_factory(engine)
        app.state.redis = redis
        try:
            yield
        finally:
            await redis.aclose()
            await engine.dispose()

    app = FastAPI(
        title="ARQ Task Throttler",
        summary="Durable task intake: accepted tasks are relayed to ARQ workers within limits.",
        version="1.0.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.include_router(tasks.router)
    app.include_router(relay.router)
    app.include_router(health.router)
    register_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.api_max_body_bytes)
    return app
