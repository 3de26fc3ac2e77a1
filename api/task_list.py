"""The task list's query: filters, page size and cursor, validated as strictly as a body.

The cursor is opaque to clients: base64url (unpadded) of a JSON object holding the last
listed task's creation time and id, the keyset the next page starts after. A keyset,
not an offset, so tasks submitted between two pages (newer than both) shift nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections import Counter
from datetime import datetime
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime

from api.deps import AccountDep
from api.submit_options import ISO_TIME_WITH_ZONE, PLAIN_DIGITS
from throttler.models import TASK_ID_LENGTH
from throttler.statuses import TaskStatus
from throttler.store.reads import TaskKey, TaskQuery

MAX_PAGE = 1000
DEFAULT_PAGE = 100
PARAMETERS = frozenset({"status", "name", "created_after", "created_before", "limit", "cursor"})
REPEATABLE = frozenset({"status"})
TIME_PARAMETERS = frozenset({"created_after", "created_before"})
_CURSOR_FIELDS = frozenset({"created_at", "task_id"})


def _query_error(name: str, kind: str, message: str, value: Any) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, naming one query parameter."""
    return RequestValidationError(
        [{"type": kind, "loc": ("query", name), "msg": message, "input": value}]
    )


def encode_cursor(key: TaskKey) -> str:
    document = {"created_at": key.created_at.isoformat(), "task_id": key.task_id}
    raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> TaskKey:
    """The keyset a cursor holds; a 422 naming ``cursor`` for anything this API did not give."""
    invalid = _query_error("cursor", "value_error", "Invalid cursor", cursor)
    if not cursor.isascii() or "=" in cursor:
        raise invalid
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        document = json.loads(raw)
    except (binascii.Error, ValueError):
        raise invalid from None
    if not isinstance(document, dict) or set(document) != _CURSOR_FIELDS:
        raise invalid
    created_at, task_id = document["created_at"], document["task_id"]
    if not (isinstance(created_at, str) and isinstance(task_id, str)):
        raise invalid
    if not task_id or len(task_id) > TASK_ID_LENGTH or not task_id.isascii():
        raise invalid
    if not task_id.isprintable():
        raise invalid
    try:
        moment = datetime.fromisoformat(created_at)
    except ValueError:
        raise invalid from None
    if moment.tzinfo is None:
        raise invalid
    return TaskKey(created_at=moment, task_id=task_id)


async def get_task_query(
    request: Request,
    account: AccountDep,
    status: Annotated[
        list[TaskStatus] | None,
        Query(description="Only tasks in this status; repeat for several (any of them)."),
    ] = None,
    name: Annotated[str | None, Query(description="Only tasks of this kind.")] = None,
    created_after: Annotated[
        AwareDatetime | None,
        Query(description="Only tasks created after this ISO-8601 time with a timezone."),
    ] = None,
    created_before: Annotated[
        AwareDatetime | None,
        Query(description="Only tasks created before this ISO-8601 time with a timezone."),
    ] = None,
    limit: Annotated[
        int,
        Query(ge=1, le=MAX_PAGE, description=f"Tasks per page, 1-{MAX_PAGE}, in plain digits."),
    ] = DEFAULT_PAGE,
    cursor: Annotated[
        str | None, Query(description="`next_cursor` of the previous page, as given.")
    ] = None,
) -> TaskQuery:
    """The caller's account's tasks the query asks for; any parameter amiss is a 422."""
    _check_spelling(request)
    return TaskQuery(
        account=account,
        statuses=frozenset(status) if status else None,
        name=name,
        created_after=created_after,
        created_before=created_before,
        after=None if cursor is None else decode_cursor(cursor),
        limit=limit,
    )


def _check_spelling(request: Request) -> None:
    """Refuse unknown, repeated or laxly spelt parameters, checked on the raw query string.

    FastAPI has parsed the values in pydantic's lax mode, taking the last of a repeated
    single-valued parameter; a misspelt filter (``?state=failed``) would list everything.
    """
    items = request.query_params.multi_items()
    counts = Counter(name for name, _ in items)
    errors: dict[str, RequestValidationError] = {}
    for name, value in items:
        error = _spelling_error(name, value, given_times=counts[name])
        if error is not None:
            errors.setdefault(name, error)
    if errors:
        raise RequestValidationError([e for error in errors.values() for e in error.errors()])


def _spelling_error(name: str, value: str, *, given_times: int) -> RequestValidationError | None:
    if name not in PARAMETERS:
        return _query_error(name, "extra_forbidden", "Extra inputs are not permitted", value)
    if given_times > 1 and name not in REPEATABLE:
        return _query_error(
            name, "value_error", f"{name} is given more than once; give it once", value
        )
    if name == "limit" and not PLAIN_DIGITS.fullmatch(value):
        return _query_error(
            name, "int_parsing", "Input should be an integer in plain decimal digits", value
        )
    if name in TIME_PARAMETERS and not ISO_TIME_WITH_ZONE.fullmatch(value):
        return _query_error(
            name, "datetime_parsing", "Input should be an ISO-8601 time with a timezone", value
        )
    return None
