"""API schemas, kept apart from the ORM classes they are read from."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from throttler.models import Task
from throttler.statuses import TaskStatus


class TaskPublic(BaseModel):
    """What a client sees of a task; times are UTC ISO-8601."""

    model_config = ConfigDict(frozen=True)

    task_id: str = Field(description="Id to poll at /api/v1/task/result/{task_id}.")
    name: str
    status: TaskStatus
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    created_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_task(cls, task: Task) -> TaskPublic:
        return cls(
            task_id=task.id,
            name=task.name,
            status=TaskStatus(task.status),
            result=task.result,
            error=task.error,
            attempts=task.attempts,
            created_at=task.created_at,
            queued_at=task.queued_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
        )


class ErrorMessage(BaseModel):
    """Body of every error except 422 (which lists the offending fields)."""

    detail: str


class Readiness(BaseModel):
    """Whether each dependency answered; ``status`` is ``ok`` only when all did."""

    status: str
    database: str
    redis: str


class Liveness(BaseModel):
    status: str
