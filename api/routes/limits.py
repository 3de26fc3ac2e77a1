"""The rules in force, and changing them at run time: GET, PUT and DELETE /limits/{scope},
pause and resume (admin keys for every change: 403 otherwise).

A change is one transaction on ``limit_rules`` and ``limit_changes``
(throttler.store.limits); after its commit the API announces it on ``LIMITS_CHANNEL`` so
that relays reload at once (they also read the version at every claim, at least twice a
second). The rules listed are the environment's (this process's ``RELAY_LIMITS`` and
shorthand, which every component is started with) merged with the API's rows, exactly as
the relays merge them (throttler.limits_in_force).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Response, status
from fastapi.exceptions import RequestValidationError
from redis.asyncio import Redis

from api.admin import AdminDep, Caller, CallerDep
from api.deps import LimitsDep, RedisDep, SettingsDep
from api.schemas import (
    ErrorMessage,
    LimitPauseBody,
    LimitRulePublic,
    LimitRulesPublic,
    LimitRuleUpdate,
)
from api.strict_json import StrictJSONRoute
from throttler.constants import API_PREFIX, LIMITS_CHANNEL
from throttler.errors import REDIS_ERRORS
from throttler.limits import EACH, LimitKey, LimitRuleError, Scope
from throttler.limits_in_force import (
    RuleInForce,
    RulesInForce,
    Source,
    in_force,
    parse_scope,
    rate_text,
)
from throttler.logs import fields
from throttler.models import utcnow
from throttler.settings import Settings
from throttler.store.limits import ChangeKind, ChangeOutcome, LimitStore

log = logging.getLogger(__name__)

ANNOUNCE_TIMEOUT_S = 0.5

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key (API_KEYS set)."},
    503: {"model": ErrorMessage, "description": "The database cannot answer now; retry later."},
}
_ADMIN: dict[int | str, dict[str, Any]] = {
    403: {"model": ErrorMessage, "description": "Not an admin key (API_ADMIN_KEYS)."},
}

router = APIRouter(prefix=API_PREFIX, tags=["limits"], route_class=StrictJSONRoute)


ScopePath = Annotated[
    str,
    Path(
        max_length=300,
        description="cluster, task:<name>, account:<id>, host:<host> (IPv6 in brackets), or "
        "* for the value; percent-encode as needed (`host:%5B%3A%3A1%5D`).",
    ),
]


def _scope(text: str) -> LimitKey:
    """The scope named in the path; a 422 quoting it when it is not one."""
    try:
        return parse_scope(text)
    except LimitRuleError as error:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("path", "scope"), "msg": str(error), "input": text}]
        ) from None


async def _rules(limits: LimitStore, settings: Settings) -> RulesInForce:
    overrides = await limits.overrides()
    return in_force(settings.limit_rules, overrides.rows)


def _public(rule: RuleInForce) -> LimitRulePublic:
    limit = rule.limit
    rated = limit is not None and limit.rate_per_s is not None
    return LimitRulePublic(
        scope=str(rule.key),
        rate=rate_text(limit.rate_per_s) if limit is not None and limit.rate_per_s else None,
        burst=limit.burst if rated and limit is not None else None,
        inflight=None if limit is None else limit.inflight,
        paused_until=rule.paused_until,
        source=rule.source.value,
    )


async def _one(limits: LimitStore, settings: Settings, key: LimitKey) -> LimitRulePublic:
    """The scope as it now stands (no rule and no pause: all null, from the environment)."""
    listing = (await _rules(limits, settings)).listing(now=utcnow())
    found = next((rule for rule in listing if rule.key == key), None)
    if found is None:
        found = RuleInForce(key=key, limit=None, paused_until=None, source=Source.ENV)
    return _public(found)


def _visible(rule: RuleInForce, caller: Caller) -> bool:
    """An ordinary key sees no other account's rule (as in GET /relay/status)."""
    if caller.admin or rule.key.scope is not Scope.ACCOUNT:
        return True
    return rule.key.value in (caller.account, EACH)


async def _announce(redis: Redis) -> None:
    """Tell relays to reload now; they also notice by themselves within half a second."""
    try:
        async with asyncio.timeout(ANNOUNCE_TIMEOUT_S):
            await redis.publish(LIMITS_CHANNEL, b"1")
    except REDIS_ERRORS as error:
        log.debug("limits.change_not_announced", extra=fields(error=repr(error)))


async def _changed(kind: ChangeKind, key: LimitKey, caller: Caller, redis: Redis) -> None:
    """Log a committed change and tell the relays about it."""
    log.info("limits.changed", extra=fields(change=kind.value, scope=str(key), by=caller.account))
    await _announce(redis)


@router.get(
    "/limits",
    name="limits",
    operation_id="list_limits",
    response_model=LimitRulesPublic,
    responses=_RESPONSES,
    summary="The rules in force on every relay, and the pauses, with where each comes from.",
)
async def list_limits(
    caller: CallerDep, settings: SettingsDep, limits: LimitsDep
) -> LimitRulesPublic:
    listing = (await _rules(limits, settings)).listing(now=utcnow())
    return LimitRulesPublic(rules=[_public(rule) for rule in listing if _visible(rule, caller)])


@router.put(
    "/limits/{scope}",
    name="set_limit",
    operation_id="set_limit",
    response_model=LimitRulePublic,
    responses=_RESPONSES | _ADMIN,
    summary="Set a scope's rule; every relay obeys it within 1 s, over RELAY_LIMITS.",
)
async def set_limit(
    scope: ScopePath,
    body: LimitRuleUpdate,
    caller: AdminDep,
    settings: SettingsDep,
    limits: LimitsDep,
    redis: RedisDep,
) -> LimitRulePublic:
    key = _scope(scope)
    await limits.change(
        ChangeKind.SET, key=key, by=caller.account, now=utcnow(), limit=body.limit()
    )
    await _changed(ChangeKind.SET, key, caller, redis)
    return await _one(limits, settings, key)


@router.delete(
    "/limits/{scope}",
    name="delete_limit",
    operation_id="delete_limit",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    responses=_RESPONSES
    | _ADMIN
    | {
        404: {
            "model": ErrorMessage,
            "description": "No rule of this scope was set through the API.",
        },
        409: {
            "model": ErrorMessage,
            "description": "The scope's rule comes from the environment: override it, not delete.",
        },
    },
    summary="Remove the rule set through the API; the environment's rule is in force again.",
)
async def delete_limit(
    scope: ScopePath, caller: AdminDep, settings: SettingsDep, limits: LimitsDep, redis: RedisDep
) -> Response:
    key = _scope(scope)
    answer = await limits.change(ChangeKind.DELETE, key=key, by=caller.account, now=utcnow())
    if answer.outcome is ChangeOutcome.NO_API_RULE:
        if any(
            rule.scope is key.scope and rule.value == key.value
            for rule in settings.limit_rules.rules
        ):
            raise HTTPException(
                status_code=status.HTTP_409_CONFLICT,
                detail=f"the rule of {str(key)!r} comes from the environment (RELAY_LIMITS, or "
                "RELAY_RATE / RELAY_BURST / RELAY_MAX_INFLIGHT for the cluster): it can be "
                "overridden with PUT, not deleted",
            )
        raise HTTPException(
            status_code=status.HTTP_404_NOT_FOUND,
            detail=f"no rule of {str(key)!r} was set through the API",
        )
    await _changed(ChangeKind.DELETE, key, caller, redis)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/limits/{scope}/pause",
    name="pause_limit",
    operation_id="pause_limit",
    response_model=LimitRulePublic,
    responses=_RESPONSES | _ADMIN,
    summary="Release nothing of a scope until a moment or for a while (tasks stay pending).",
)
async def pause_limit(
    scope: ScopePath,
    body: LimitPauseBody,
    caller: AdminDep,
    settings: SettingsDep,
    limits: LimitsDep,
    redis: RedisDep,
) -> LimitRulePublic:
    key = _scope(scope)
    now = utcnow()
    until = body.paused_until(now)
    if until <= now:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "until"),
                    "msg": "until must be in the future",
                    "input": until.isoformat(),
                }
            ]
        )
    await limits.change(ChangeKind.PAUSE, key=key, by=caller.account, now=now, paused_until=until)
    await _changed(ChangeKind.PAUSE, key, caller, redis)
    return await _one(limits, settings, key)


@router.post(
    "/limits/{scope}/resume",
    name="resume_limit",
    operation_id="resume_limit",
    response_model=LimitRulePublic,
    responses=_RESPONSES | _ADMIN,
    summary="End a scope's pause now.",
)
async def resume_limit(
    scope: ScopePath, caller: AdminDep, settings: SettingsDep, limits: LimitsDep, redis: RedisDep
) -> LimitRulePublic:
    key = _scope(scope)
    await limits.change(ChangeKind.RESUME, key=key, by=caller.account, now=utcnow())
    await _changed(ChangeKind.RESUME, key, caller, redis)
    return await _one(limits, settings, key)
