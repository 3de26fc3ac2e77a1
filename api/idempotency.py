"""The ``Idempotency-Key`` header, and how a submit answers a key already bound to a task.

The binding itself is the database's (a unique index on (account, idempotency_key),
written by ``throttler.store.intake``); this module reads the header, and turns the
intake's outcome into a replay (the original task's view) or a 422.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any, Final

from fastapi import Request
from fastapi.exceptions import RequestValidationError

from api.schemas import KEY_PATTERN, TaskPublic
from throttler.models import IDEMPOTENCY_KEY_LENGTH
from throttler.store.intake import Existing

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


def original_views(holders: Iterable[Existing | None]) -> dict[str, TaskPublic]:
    """The view of each task a key is bound to, as the intake's transaction read it back.

    No second read: the intake's own read-back (in the transaction that found the key
    taken) already holds the whole view, so a replay costs what a plain submit costs.
    """
    return {
        holder.task_id: TaskPublic.from_task(holder.view)
        for holder in holders
        if holder is not None
    }
