"""Liveness and readiness probes for orchestrators and compose healthchecks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Response, status
from redis.asyncio import Redis
from sqlalchemy.exc import SQLAlchemyError

from api.deps import ReadsDep, RedisDep
from api.schemas import Liveness, Readiness
from throttler.errors import REDIS_ERRORS
from throttler.logs import fields
from throttler.store.reads import ReadStore

log = logging.getLogger(__name__)

# A probe must answer before the orchestrator's own timeout, whatever the dependency does.
READY_TIMEOUT_S = 2.0
OK = "ok"
UNAVAILABLE = "unavailable"

router = APIRouter(tags=["health"])


def _describe(error: BaseException) -> str:
    return " ".join(f"{type(error).__name__}: {error}".split())[:200]


@router.get("/healthz", response_model=Liveness, summary="The process is alive.")
async def healthz() -> Liveness:
    return Liveness(status=OK)


async def _database_blocker(reads: ReadStore) -> str | None:
    # Ready means a write would succeed now, not merely that SELECT 1 answers.
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            reason = await reads.write_blocker()
    except (SQLAlchemyError, OSError) as error:  # TimeoutError is an OSError
        reason = _describe(error)
    if reason is not None:
        log.warning("ready.database_failed", extra=fields(error=reason))
    return reason


async def _redis_blocker(redis: Redis) -> str | None:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await redis.ping()
    except REDIS_ERRORS as error:
        reason = _describe(error)
        log.warning("ready.redis_failed", extra=fields(error=reason))
        return reason
    return None


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Readiness,
        "description": "The database cannot take a write now, or Redis does not answer.",
    }
}


@router.get(
    "/readyz",
    response_model=Readiness,
    response_model_exclude_none=True,
    responses=_NOT_READY,
    summary="The database would take a write now and Redis answers.",
)
async def readyz(reads: ReadsDep, redis: RedisDep, response: Response) -> Readiness:
    database, redis_reason = await asyncio.gather(_database_blocker(reads), _redis_blocker(redis))
    reasons = [
        f"{name}: {reason}"
        for name, reason in (("database", database), ("redis", redis_reason))
        if reason is not None
    ]
    if reasons:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(
        status=UNAVAILABLE if reasons else OK,
        database=OK if database is None else UNAVAILABLE,
        redis=OK if redis_reason is None else UNAVAILABLE,
        reason="; ".join(reasons) or None,
    )
