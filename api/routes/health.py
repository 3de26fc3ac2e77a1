"""Liveness and readiness probes for orchestrators and compose healthchecks."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter, Response, status
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from api.deps import ReadsDep, RedisDep
from api.schemas import Liveness, Readiness
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


async def _database_ok(reads: ReadStore) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await reads.ping()
    except (SQLAlchemyError, OSError) as error:  # TimeoutError is an OSError
        log.warning("ready.database_failed", extra=fields(error=_describe(error)))
        return False
    return True


async def _redis_ok(redis: Redis) -> bool:
    try:
        async with asyncio.timeout(READY_TIMEOUT_S):
            await redis.ping()
    except (RedisError, OSError) as error:
        log.warning("ready.redis_failed", extra=fields(error=_describe(error)))
        return False
    return True


_NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": Readiness, "description": "A dependency did not answer in time."}
}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses=_NOT_READY,
    summary="The database and Redis both answer.",
)
async def readyz(reads: ReadsDep, redis: RedisDep, response: Response) -> Readiness:
    database_ok, redis_ok = await asyncio.gather(_database_ok(reads), _redis_ok(redis))
    if not (database_ok and redis_ok):
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return Readiness(
        status=OK if database_ok and redis_ok else UNAVAILABLE,
        database=OK if database_ok else UNAVAILABLE,
        redis=OK if redis_ok else UNAVAILABLE,
    )
