"""The vocabulary of task life: statuses and the events that record each transition."""

from __future__ import annotations

from enum import StrEnum


class TaskStatus(StrEnum):
    """Where a task is in its life; stored as text so auditors can read it."""

    PENDING = "pending"  # accepted and in the outbox, waiting for the relay
    QUEUED = "queued"  # released by the relay into ARQ (or waiting there for a retry)
    RUNNING = "running"  # a worker has started an attempt
    SUCCEEDED = "succeeded"  # finished with a result; final
    FAILED = "failed"  # gave up with an error; final
    CANCELLED = "cancelled"  # withdrawn before it ran; final

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED})
# Statuses that hold an in-flight slot: handed to ARQ and not yet finished.
INFLIGHT_STATUSES = frozenset({TaskStatus.QUEUED, TaskStatus.RUNNING})


class EventKind(StrEnum):
    """One row in ``task_events`` per transition; the append-only audit trail."""

    SUBMITTED = "submitted"  # the API committed the task and its outbox row
    QUEUED = "queued"  # the relay released it to ARQ
    STARTED = "started"  # a worker began an attempt
    RETRYING = "retrying"  # an attempt failed and another is scheduled
    SUCCEEDED = "succeeded"  # the task produced its result
    FAILED = "failed"  # the task gave up
    CANCELLED = "cancelled"  # the task was withdrawn
    REQUEUED = "requeued"  # recovery put the task back in the outbox
    RETRIED = "retried"  # an explicit retry took a failed or cancelled task back to pending
