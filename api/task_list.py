"""The task list's query: filters, page size and cursor, validated as strictly as a body.

The cursor is opaque to clients: base64url (unpadded) of a JSON object holding the last
listed task's creation time and id, the keyset the next page starts after. A keyset,
not an offset, so tasks submitted between two pages (newer than both) shift nothing.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated

from fastapi import Query, Request
from pydantic import AwareDatetime

from api.admin import ACCOUNT_PARAMETER, ReadAccountDep
from api.strict_query import QuerySpelling, query_error
from throttler.labels import GRAMMAR, LabelError, check_label
from throttler.models import TASK_ID_LENGTH
from throttler.statuses import TaskStatus
from throttler.store.reads import TaskKey, TaskQuery

MAX_PAGE = 1000
DEFAULT_PAGE = 100
SPELLING = QuerySpelling(
    names=frozenset(
        {
            "status",
            "name",
            "key",
            "created_after",
            "created_before",
            "limit",
            "cursor",
            ACCOUNT_PARAMETER,
        }
    ),
    integers=frozenset({"limit"}),
    times=frozenset({"created_after", "created_before"}),
    repeatable=frozenset({"status"}),
)
_CURSOR_FIELDS = frozenset({"created_at", "task_id"})


def encode_cursor(key: TaskKey) -> str:
    document = {"created_at": key.created_at.isoformat(), "task_id": key.task_id}
    raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str) -> TaskKey:
    """The keyset a cursor holds; a 422 naming ``cursor`` for anything this API did not give."""
    invalid = query_error("cursor", "value_error", "Invalid cursor", cursor)
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


def _label(value: str) -> str:
    try:
        return check_label(value)
    except LabelError as error:
        raise query_error("key", "value_error", error.message, value) from None


async def get_task_query(
    request: Request,
    account: ReadAccountDep,
    status: Annotated[
        list[TaskStatus] | None,
        Query(description="Only tasks in this status; repeat for several (any of them)."),
    ] = None,
    name: Annotated[str | None, Query(description="Only tasks of this kind.")] = None,
    key: Annotated[
        str | None,
        Query(description=f"Only tasks with this label, {GRAMMAR}; given once."),
    ] = None,
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
    """The tasks the query asks for, of the caller's account (or, for an admin key, of
    ``account=``); any parameter amiss is a 422."""
    SPELLING.check(request)
    return TaskQuery(
        account=account,
        statuses=frozenset(status) if status else None,
        name=name,
        label=None if key is None else _label(key),
        created_after=created_after,
        created_before=created_before,
        after=None if cursor is None else decode_cursor(cursor),
        limit=limit,
    )
