"""What the flow-control limits are doing: per limited key, tasks waiting, in flight, sent."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from api.admin import FORBIDDEN_RESPONSE, CountedAccountDep
from api.deps import LimitsDep, ReadsDep, RedisDep, SettingsDep
from api.relay_status import relay_status, relays_alive
from api.schemas import ErrorMessage, RelayStatus
from throttler.constants import API_PREFIX
from throttler.limits_in_force import in_force
from throttler.models import utcnow
from throttler.nodes import NodeRegistry

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key (API_KEYS set)."},
    503: {"model": ErrorMessage, "description": "The database cannot answer now; retry later."},
}

router = APIRouter(prefix=API_PREFIX, tags=["relay"])


@router.get(
    "/relay/status",
    name="relay_status",
    operation_id="relay_status",
    response_model=RelayStatus,
    responses=_RESPONSES | FORBIDDEN_RESPONSE,
    summary="Backlog, in-flight and recent dispatches per limited key; relays alive.",
)
async def get_relay_status(
    account: CountedAccountDep,
    settings: SettingsDep,
    reads: ReadsDep,
    redis: RedisDep,
    limits: LimitsDep,
) -> RelayStatus:
    # The rules in force, as the relays obey them: the environment's and the API's.
    overrides = await limits.overrides()
    rules = in_force(settings.limit_rules, overrides.rows).rules
    # With API keys an ordinary key's view is its own: counts over its own tasks only.
    return await relay_status(
        reads,
        rules=rules,
        account=account,
        now=utcnow(),
        alive_relays=await relays_alive(NodeRegistry(redis)),
    )
