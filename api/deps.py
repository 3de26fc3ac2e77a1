"""Request dependencies as ``Annotated`` aliases: settings, sessions, stores, Redis, the account.

All are ``async def``: none blocks, and FastAPI runs a plain ``def`` dependency in a worker
thread, a hop per dependency per request.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from redis.asyncio import Redis

from api.announce import NewWorkAnnouncer
from api.intake import IntakeWriter
from api.waiters import Waiters
from throttler.constants import DEFAULT_ACCOUNT
from throttler.settings import Settings
from throttler.store.cancels import CancelStore
from throttler.store.limits import LimitStore
from throttler.store.reads import ReadStore
from throttler.store.retries import RetryStore


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_reads(request: Request) -> ReadStore:
    reads: ReadStore = request.app.state.reads
    return reads


async def get_retries(request: Request) -> RetryStore:
    retries: RetryStore = request.app.state.retries
    return retries


async def get_cancels(request: Request) -> CancelStore:
    cancels: CancelStore = request.app.state.cancels
    return cancels


async def get_announcer(request: Request) -> NewWorkAnnouncer:
    announcer: NewWorkAnnouncer = request.app.state.announcer
    return announcer


async def get_intake(request: Request) -> IntakeWriter:
    intake: IntakeWriter = request.app.state.intake
    return intake


def get_waiters(request: Request) -> Waiters:
    waiters: Waiters = request.app.state.waiters
    return waiters


async def get_limits(request: Request) -> LimitStore:
    limits: LimitStore = request.app.state.limits
    return limits


async def get_redis(request: Request) -> Redis:
    redis: Redis = request.app.state.redis
    return redis


SettingsDep = Annotated[Settings, Depends(get_settings)]
# The API's reads (results, relay status, readiness): they never wait behind writers.
ReadsDep = Annotated[ReadStore, Depends(get_reads)]
# Explicit retries of failed and cancelled tasks (throttler.store.retries).
RetriesDep = Annotated[RetryStore, Depends(get_retries)]
# Cancels of pending, queued and running tasks (throttler.store.cancels).
CancelsDep = Annotated[CancelStore, Depends(get_cancels)]
# Wakes idle relays after a commit that put tasks in the outbox other than the intake's.
AnnouncerDep = Annotated[NewWorkAnnouncer, Depends(get_announcer)]
RedisDep = Annotated[Redis, Depends(get_redis)]
# Rules and pauses set through the API (throttler.store.limits).
LimitsDep = Annotated[LimitStore, Depends(get_limits)]
WaitersDep = Annotated[Waiters, Depends(get_waiters)]
# New tasks go through the process's group-commit writer (api.intake).
IntakeDep = Annotated[IntakeWriter, Depends(get_intake)]

# auto_error=False: a missing key is only an error when API_KEYS is set, and then the
# answer must be 401 with WWW-Authenticate. The scheme still shows in /docs.
bearer_scheme = HTTPBearer(auto_error=False, description="An API key from API_KEYS.")


def unauthorized() -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def account_of_key(accounts_by_key: Mapping[str, str], presented: str) -> str | None:
    """Return the account of the presented API key, or None for an unknown key."""
    presented_bytes = presented.encode()
    account: str | None = None
    # Compare with every key, without stopping early, so timing reveals nothing.
    for key, candidate in accounts_by_key.items():
        if hmac.compare_digest(key.encode(), presented_bytes):
            account = candidate
    return account


def account_of_authorization(
    accounts_by_key: Mapping[str, str], authorization: str | None
) -> str | None:
    """The account of an ``Authorization`` header as ``get_account`` reads it, or None."""
    scheme, credentials = get_authorization_scheme_param(authorization)
    # fastapi.security.HTTPBearer's reading of the header.
    if not (authorization and scheme and credentials) or scheme.lower() != "bearer":
        return None
    return account_of_key(accounts_by_key, credentials)


async def get_account(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    """Return the caller's account: the API key's, or the default when keys are off."""
    accounts = settings.accounts_by_key
    if not accounts:
        return DEFAULT_ACCOUNT
    if credentials is None:
        raise unauthorized()
    account = account_of_key(accounts, credentials.credentials)
    if account is None:
        raise unauthorized()
    return account


AccountDep = Annotated[str, Depends(get_account)]
