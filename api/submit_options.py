"""Submission options carried as query parameters: priority, a delay or a start time, and
labels (``key``, repeatable: throttler.labels).

They sit outside the JSON body so that a task's own fields never collide with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Query, Request
from pydantic import AwareDatetime

from api.strict_query import QuerySpelling, query_error
from throttler.catalog import TaskInput
from throttler.constants import DEFAULT_PRIORITY
from throttler.labels import GRAMMAR, MAX_LABELS, LabelError, labels_of
from throttler.models import utcnow
from throttler.submit import NewTask

MIN_PRIORITY = 0
MAX_PRIORITY = 9
# How far ahead a task may be scheduled; beyond this a client should keep the task itself.
MAX_DELAY_S = 30 * 24 * 3600
SPELLING = QuerySpelling(
    names=frozenset({"priority", "delay_s", "run_at", "key"}),
    integers=frozenset({"priority", "delay_s"}),
    times=frozenset({"run_at"}),
    repeatable=frozenset({"key"}),
)


@dataclass(frozen=True, kw_only=True, slots=True)
class SubmitOptions:
    """How a submission is scheduled: its priority within its account, and when it is due."""

    priority: int = DEFAULT_PRIORITY
    delay_s: int | None = None
    run_at: datetime | None = None
    # Sorted, each once (throttler.labels.labels_of).
    labels: tuple[str, ...] = ()

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
            labels=self.labels,
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
    key: Annotated[
        list[str] | None,
        Query(
            description=f"A label for the task, {GRAMMAR}; repeat for up to {MAX_LABELS} "
            "(each once). GET /api/v1/tasks?key= lists the tasks carrying one.",
        ),
    ] = None,
) -> SubmitOptions:
    """Validate the submission options; unknown query parameters are rejected too."""
    SPELLING.check(request)
    if delay_s is not None and run_at is not None:
        raise query_error(
            "run_at", "value_error", "give either delay_s or run_at, not both", str(run_at)
        )
    if run_at is not None and run_at > utcnow() + timedelta(seconds=MAX_DELAY_S):
        raise query_error(
            "run_at",
            "less_than_equal",
            f"run_at may be at most {MAX_DELAY_S} seconds ahead",
            str(run_at),
        )
    labels = query_labels(key or [])
    return SubmitOptions(priority=priority, delay_s=delay_s, run_at=run_at, labels=labels)


def query_labels(values: list[str]) -> tuple[str, ...]:
    """The labels of the repeated ``key`` parameter; a 422 naming ``key`` if one is amiss."""
    try:
        return labels_of(values)
    except LabelError as error:
        raise query_error("key", "value_error", error.message, error.value) from None
