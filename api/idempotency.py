"""The ``Idempotency-Key`` header, and how a submit answers a key already bound to a task.

The binding itself is the database's (a unique index on (account, idempotency_key),
written by ``throttler.store.intake``); this module reads the header, and turns the
intake's outcome into a replay (the original task's view) or a 422.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final

from fastapi import HTTPException, Request, status
from fastapi.exceptions import RequestValidationError

from api.deps import get_reads
from api.schemas import KEY_PATTERN, TaskPublic
from throttler.models import IDEMPOTENCY_KEY_LENGTH

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
_KEY = re.compile(KEY_PATTERN)

# The header as the submit endpoints' OpenAPI operations list it (the endpoints read it
# from the request themselves, which keeps them on api.fast_path).
OPENAPI_PARAMETER: Final[dict[str, Any]] = {
    "name": HEADER,
    "in": "header",
    "required": False,
    "description": "1-255 visible ASCII characters. The same key with the same request "
    f"answers 200 with the original task and `{REPLAYED_HEADER}: true`, creating nothing; "
    "with a different request, 422.",
    "schema": {"type": "string", "pattern": KEY_PATTERN},
}
REPLAY_RESPONSE: Final[dict[int | str, dict[str, Any]]] = {
    200: {
        "description": f"A replay: the task this {HEADER} was first given to; nothing created.",
        "headers": {REPLAYED_HEADER: {"schema": {"type": "string", "enum": ["true"]}}},
    }
}


def _header_error(message: str, value: Any) -> RequestValidationError:
    return RequestValidationError(
        [{"type": "value_error", "loc": ("header", HEADER), "msg": message, "input": value}]
    )


def header_key(request: Request) -> str | None:
    """The request's idempotency key, or None; a 422 for a malformed or repeated header."""
    values = request.headers.getlist(HEADER)
    if not values:
        return None
    if len(values) > 1:
        raise _header_error(f"give {HEADER} once", values)
    if not _KEY.fullmatch(values[0]):
        raise _header_error(
            f"{HEADER} must be 1-{IDEMPOTENCY_KEY_LENGTH} visible ASCII characters", values[0]
        )
    return values[0]


def header_reused() -> RequestValidationError:
    """The 422 for a key already bound to a different request."""
    return _header_error(f"this {HEADER} was used for a different request", None)


def items_reused(indexes: Sequence[int]) -> RequestValidationError:
    """The bulk 422: each item whose key is bound to a different request."""
    return RequestValidationError(
        [
            {
                "type": "value_error",
                "loc": ("body", "tasks", index, "idempotency_key"),
                "msg": "this idempotency_key was used for a different request",
                "input": None,
            }
            for index in indexes
        ]
    )


async def original_views(
    request: Request, *, account: str, task_ids: Sequence[str]
) -> dict[str, TaskPublic]:
    """The current view of each task a key is bound to."""
    reads = await get_reads(request)
    views: dict[str, TaskPublic] = {}
    for task_id in dict.fromkeys(task_ids):
        task = await reads.task(task_id=task_id, account=account)
        if task is None:
            # Deleted since the insert saw it: the key is free again, so a retry creates.
            raise HTTPException(
                status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
                detail=f"the task of this {HEADER} was just deleted; retry",
                headers={"Retry-After": "1"},
            )
        views[task_id] = TaskPublic.from_task(task)
    return views
