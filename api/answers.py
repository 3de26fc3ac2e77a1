"""What the task routes answer besides success: their documented errors, and the 404.

Shared by every router that serves one task or the caller's tasks (reads, retries,
cancels), so each error is described, and decided, in one place.
"""

from __future__ import annotations

from typing import Any

from fastapi import HTTPException, status

from api.schemas import ErrorMessage
from throttler.models import TASK_ID_LENGTH

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorMessage, "description": "Missing or invalid API key (API_KEYS set)."}
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {
        "model": ErrorMessage,
        "description": "The database cannot take the request now; retry later.",
        "headers": {
            "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}
        },
    }
}
TASK_RESPONSES: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    404: {"model": ErrorMessage, "description": "No such task for this account."},
    **UNAVAILABLE,
}


def checked_id(task_id: str) -> HTTPException:
    """The 404 for ``task_id``, raised at once if no task can have that id."""
    # Another account's task answers exactly like a missing one: no existence leak.
    not_found = HTTPException(status_code=status.HTTP_404_NOT_FOUND, detail="task not found")
    # Ids are printable ASCII; anything else (NUL, which a database may reject outright) is
    # unknown without asking the database.
    if len(task_id) > TASK_ID_LENGTH or not (task_id.isascii() and task_id.isprintable()):
        raise not_found
    return not_found
