"""Submission options carried as query parameters: priority, and a delay or a start time.

They sit outside the JSON body so that a task's own fields never collide with them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

from fastapi import Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime

from throttler.catalog import TaskInput
from throttler.constants import DEFAULT_PRIORITY
from throttler.models import utcnow
from throttler.submit import NewTask

MIN_PRIORITY = 0
MAX_PRIORITY = 9
# How far ahead a task may be scheduled; beyond this a client should keep the task itself.
MAX_DELAY_S = 30 * 24 * 3600
OPTION_NAMES = frozenset({"priority", "delay_s", "run_at"})
INTEGER_OPTIONS = frozenset({"priority", "delay_s"})
# As strict as a JSON body: pydantic's lax mode would also take "5.0", "1_000", "+5", " 5",
# "-0" or non-ASCII digits, and an epoch number for a time. None of the options is negative.
PLAIN_DIGITS = re.compile(r"[0-9]+")
# ISO-8601 date and time with a timezone, nothing around it: never a bare epoch number.
ISO_TIME_WITH_ZONE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]+)?)?(Z|[+-][0-9]{2}:[0-9]{2})",
    re.IGNORECASE,
)


@dataclass(frozen=True, kw_only=True, slots=True)
class SubmitOptions:
    """How a submission is scheduled: its priority within its account, and when it is due."""

    priority: int = DEFAULT_PRIORITY
    delay_s: int | None = None
    run_at: datetime | None = None

    def due_at(self, now: datetime) -> datetime | None:
        """Return when the task becomes eligible, or None for "as soon as limits allow"."""
        if self.delay_s:
            return now + timedelta(seconds=self.delay_s)
        if self.run_at is not None and self.run_at > now:
            return self.run_at.astimezone(UTC)
        # A start time already past means now.
        return None

    def new_task(self, *, name: str, task_input: TaskInput, account: str, now: datetime) -> NewTask:
        """Return the validated submission, scheduled by these options, ready to insert."""
        return NewTask(
            name=name,
            account=account,
            payload=task_input.model_dump(mode="json"),
            created_at=now,
            priority=self.priority,
            host=task_input.limit_host(),
            run_at=self.due_at(now),
        )


def _query_error(name: str, kind: str, message: str, value: Any) -> RequestValidationError:
    """A 422 shaped like FastAPI's own, naming one query parameter."""
    return RequestValidationError(
        [{"type": kind, "loc": ("query", name), "msg": message, "input": value}]
    )


async def get_submit_options(
    request: Request,
    priority: Annotated[
        int,
        Query(
            ge=MIN_PRIORITY,
            le=MAX_PRIORITY,
            description="0-9 in plain digits, given once; higher runs first among the same "
            "account's waiting tasks.",
        ),
    ] = DEFAULT_PRIORITY,
    delay_s: Annotated[
        int | None,
        Query(
            ge=0,
            le=MAX_DELAY_S,
            description=f"Seconds to wait before the task may run (at most {MAX_DELAY_S}), in "
            "plain digits, given once.",
        ),
    ] = None,
    run_at: Annotated[
        AwareDatetime | None,
        Query(
            description="ISO-8601 time with a timezone before which the task does not run; "
            "a past time means now; never an epoch number. Given once, not together with delay_s.",
        ),
    ] = None,
) -> SubmitOptions:
    """Validate the submission options; unknown query parameters are rejected too."""
    _check_spelling(request)
    if delay_s is not None and run_at is not None:
        raise _query_error(
            "run_at", "value_error", "give either delay_s or run_at, not both", str(run_at)
        )
    if run_at is not None and run_at > utcnow() + timedelta(seconds=MAX_DELAY_S):
        raise _query_error(
            "run_at",
            "less_than_equal",
            f"run_at may be at most {MAX_DELAY_S} seconds ahead",
            str(run_at),
        )
    return SubmitOptions(priority=priority, delay_s=delay_s, run_at=run_at)


def _check_spelling(request: Request) -> None:
    """Refuse unknown, repeated or laxly spelt options, checked on the raw query string.

    FastAPI has already parsed the values (in pydantic's lax mode, taking the last of a
    repeated option); this holds the query to the same strictness as a body.
    """
    items = request.query_params.multi_items()
    counts = Counter(name for name, _ in items)
    errors: dict[str, RequestValidationError] = {}
    for name, value in items:
        error = _spelling_error(name, value, given_times=counts[name])
        if error is not None:
            # One error per parameter, the first found.
            errors.setdefault(name, error)
    if errors:
        raise RequestValidationError([e for error in errors.values() for e in error.errors()])


def _spelling_error(name: str, value: str, *, given_times: int) -> RequestValidationError | None:
    """The error for one raw query option, or None when it is spelt as it must be."""
    if name not in OPTION_NAMES:
        # A misspelt option (``?delay=30``) must not silently run the task at once.
        return _query_error(name, "extra_forbidden", "Extra inputs are not permitted", value)
    if given_times > 1:
        # Taking the first or the last would silently drop what the client also asked for.
        return _query_error(
            name, "value_error", f"{name} is given more than once; give it once", value
        )
    if name in INTEGER_OPTIONS and not PLAIN_DIGITS.fullmatch(value):
        return _query_error(
            name, "int_parsing", "Input should be an integer in plain decimal digits", value
        )
    if name == "run_at" and not ISO_TIME_WITH_ZONE.fullmatch(value):
        return _query_error(
            name, "datetime_parsing", "Input should be an ISO-8601 time with a timezone", value
        )
    return None
