"""What GET /api/v1/dashboard and GET /api/v1/dashboard/tasks/{task_id} answer."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from api.schemas import NodePublic, TaskEventPublic, TaskPublic, WorkerNodePublic


class ScopePublic(BaseModel):
    """One limited scope: its tasks and the caps of the rule it obeys."""

    model_config = ConfigDict(frozen=True)

    scope: str = Field(description="cluster, task:<name>, account:<id>, host:<host>, key:<label>")
    backlog: int
    inflight: int
    dispatched_last_minute: int
    inflight_cap: int | None
    rate_per_s: float | None


class ReleasesPublic(BaseModel):
    """Releases to ARQ in each second of the last five minutes, per scope, oldest first."""

    model_config = ConfigDict(frozen=True)

    start: int = Field(description="The first second, in Unix seconds.")
    step_s: int
    series: dict[str, list[int]] = Field(description="`cluster` (every release) and each scope.")


class PausePublic(BaseModel):
    model_config = ConfigDict(frozen=True)

    scope: str
    until: datetime


class FailurePublic(BaseModel):
    """A task that gave up, with the error it gave up with."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    name: str
    account: str
    at: datetime
    error: str | None


class DashboardPublic(BaseModel):
    """The dashboard's live data: one summary, read at most once a second per API process."""

    model_config = ConfigDict(frozen=True)

    as_of: datetime
    account: str = Field(description="The caller's account.")
    admin: bool = Field(description="Whether the caller's key may change limits.")
    counts: dict[str, int | None] = Field(
        description="Tasks by status: pending, queued and running as of `as_of`; succeeded, "
        "failed and cancelled as of `finished_as_of` (null until first counted)."
    )
    finished_as_of: datetime | None
    outbox_backlog: int
    outbox_oldest_age_s: float
    scopes: list[ScopePublic]
    releases: ReleasesPublic
    paused: list[PausePublic]
    relays: list[NodePublic] | None = Field(description="Null: Redis could not be asked.")
    workers: list[WorkerNodePublic] | None
    failures: list[FailurePublic] = Field(
        description="The latest tasks that failed in the last 24 hours (the caller's own "
        "unless an admin key), newest first."
    )


class DashboardTaskPublic(BaseModel):
    """A task's view (with why it waits) and its timeline, in one answer."""

    model_config = ConfigDict(frozen=True)

    account: str
    task: TaskPublic
    events: list[TaskEventPublic]
