"""Which relays and workers run: their heartbeats in the node registry (throttler.nodes)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, status

from api.deps import AccountDep, RedisDep
from api.errors import RETRY_AFTER_S
from api.schemas import ErrorMessage, NodePublic, NodesPublic, WorkerNodePublic
from throttler.constants import API_PREFIX
from throttler.errors import REDIS_ERRORS
from throttler.nodes import NodeKind, NodeRegistry, NodeState

_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key (API_KEYS set)."},
    503: {"model": ErrorMessage, "description": "Redis cannot answer now; retry later."},
}

router = APIRouter(prefix=API_PREFIX, tags=["nodes"])


def _public(state: NodeState) -> dict[str, Any]:
    return {
        "id": state.id,
        "host": state.host,
        "pid": state.pid,
        "started_at": state.started_at,
        "last_seen": state.last_seen,
        "alive": state.alive,
    }


@router.get(
    "/nodes",
    name="nodes",
    operation_id="list_nodes",
    response_model=NodesPublic,
    responses=_RESPONSES,
    summary="Relay and worker processes, alive or lately dead.",
)
async def list_nodes(_account: AccountDep, redis: RedisDep) -> NodesPublic:
    try:
        states = await NodeRegistry(redis).nodes()
    except REDIS_ERRORS:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="redis unavailable, retry later",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        ) from None
    return NodesPublic(
        relays=[NodePublic(**_public(s)) for s in states if s.kind is NodeKind.RELAY],
        workers=[
            WorkerNodePublic(**_public(s), running=s.running or 0)
            for s in states
            if s.kind is NodeKind.WORKER
        ],
    )
