"""API schemas, kept apart from the ORM classes they are read from."""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import Enum
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)

from api.strict_query import ISO_TIME_WITH_ZONE
from api.submit_options import MAX_DELAY_S, MAX_PRIORITY, MIN_PRIORITY
from throttler.constants import DEFAULT_PRIORITY
from throttler.labels import GRAMMAR, LABEL_PATTERN, MAX_LABELS, LabelError, check_label, labels_of
from throttler.limits import Limit, LimitRuleError, parse_rule
from throttler.models import IDEMPOTENCY_KEY_LENGTH, TASK_NAME_LENGTH, utcnow
from throttler.nodes import ALIVE_WITHIN_S, FORGET_AFTER_S
from throttler.statuses import EventKind, TaskStatus
from throttler.store.cancels import CANCELLABLE_STATUSES, MAX_CANCELS_PER_CALL, CancelFilter
from throttler.store.reads import EventView, TaskView
from throttler.store.retries import MAX_RETRIES_PER_CALL, RETRIABLE_STATUSES, RetryFilter
from throttler.submit import NewTask
from throttler.waiting import Reason, Waiting, on_arrival

# 1 to 255 visible ASCII characters (0x21-0x7E), for an idempotency key.
KEY_PATTERN = rf"^[!-~]{{1,{IDEMPOTENCY_KEY_LENGTH}}}$"
# A task label (the API's key): a 422 naming it, its pattern shown in the docs.
Label = Annotated[
    StrictStr, AfterValidator(check_label), Field(json_schema_extra={"pattern": LABEL_PATTERN})
]


class Unasked(Enum):
    """``TaskPublic.from_task`` was given no ``waiting``: no board was read."""

    UNASKED = "unasked"


class WaitingPublic(BaseModel):
    """Why a pending task has not been handed to ARQ yet, as the relays saw it."""

    model_config = ConfigDict(frozen=True)

    reason: Reason
    scope: str | None = Field(
        description="The limited scope holding it back, e.g. `task:greeting`; null if none."
    )
    until: datetime | None = Field(
        description="When that ends, if known: run_at, the next token, the pause's end."
    )

    @classmethod
    def of(cls, waiting: Waiting | None) -> WaitingPublic | None:
        return None if waiting is None else _waiting_public(waiting)


@lru_cache(maxsize=1024)
def _waiting_public(waiting: Waiting) -> WaitingPublic:
    """One view per distinct reason, shared (it is frozen): the views of a 1,000-task 202
    hold a thousand equal ones."""
    scope = None if waiting.scope is None else str(waiting.scope)
    return WaitingPublic(reason=waiting.reason, scope=scope, until=waiting.until)


class TaskPublic(BaseModel):
    """What a client sees of a task; times are UTC ISO-8601."""

    model_config = ConfigDict(frozen=True)

    task_id: str = Field(description="Id to poll at /api/v1/task/result/{task_id}.")
    name: str
    status: TaskStatus
    result: dict[str, Any] | None
    error: str | None
    attempts: int
    priority: int = Field(description="0-9; higher runs first among the account's tasks.")
    keys: list[str] = Field(description="The task's labels (key at submission), sorted.")
    waiting: WaitingPublic | None = Field(
        default=None,
        description="Why a pending task waits; null for other statuses, or if Redis is away.",
    )
    created_at: datetime
    run_at: datetime | None = Field(
        description="When the task becomes eligible to run; null means at once."
    )
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None

    @classmethod
    def from_task(
        cls, task: TaskView, *, waiting: Waiting | Unasked | None = Unasked.UNASKED
    ) -> TaskPublic:
        """The view of ``task``; ``waiting``: its reason, as ``api.waiting`` found it.

        Not given (a view no relay board was read for: a retry's, a replay's), a pending
        task waits for its run_at or its turn, as a submitted one does.
        """
        if waiting is Unasked.UNASKED:
            waiting = None
            if task.status is TaskStatus.PENDING:
                waiting = on_arrival(run_at=task.run_at, now=utcnow())
        return cls(
            task_id=task.task_id,
            name=task.name,
            status=task.status,
            result=task.result,
            error=task.error,
            attempts=task.attempts,
            priority=task.priority,
            keys=list(task.labels),
            waiting=WaitingPublic.of(waiting),
            created_at=task.created_at,
            run_at=task.run_at,
            queued_at=task.queued_at,
            started_at=task.started_at,
            finished_at=task.finished_at,
        )

    @classmethod
    def pending(cls, task: NewTask) -> TaskPublic:
        """The view of a task just submitted (what ``from_task`` would read back)."""
        return cls(**cls.pending_fields(task))

    @staticmethod
    def pending_fields(task: NewTask) -> dict[str, Any]:
        """The fields of ``pending(task)``, for a batch's views (``api.batch_views``)."""
        return {
            "task_id": task.task_id,
            "name": task.name,
            "status": TaskStatus.PENDING,
            "result": None,
            "error": None,
            "attempts": 0,
            "priority": task.priority,
            "keys": list(task.labels),
            # No relay was asked: a 202 costs no Redis round trip.
            "waiting": WaitingPublic.of(on_arrival(run_at=task.run_at, now=task.created_at)),
            "created_at": task.created_at,
            "run_at": task.run_at,
            "queued_at": None,
            "started_at": None,
            "finished_at": None,
        }


class TaskListPublic(BaseModel):
    """A page of the caller's tasks, newest first."""

    tasks: list[TaskPublic]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class TaskEventPublic(BaseModel):
    """One transition in a task's history."""

    model_config = ConfigDict(frozen=True)

    at: datetime
    event: EventKind
    detail: dict[str, Any] = Field(
        description="What the transition carries: attempt, worker, relay, error."
    )

    @classmethod
    def from_event(cls, event: EventView) -> TaskEventPublic:
        return cls(at=event.at, event=event.event, detail=event.detail)


class TaskEventsPublic(BaseModel):
    """A task's history, oldest first."""

    events: list[TaskEventPublic]


# Tasks per bulk request; its body may be up to BULK_MAX_BODY_BYTES (api.body_limit).
MAX_BULK_TASKS = 1000


class TaskItemCreate(BaseModel):
    """One task of a bulk submission: its kind, its own fields, and how to schedule it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr = Field(description="A task kind, as in POST /api/v1/task/{name}.")
    input: dict[str, Any] = Field(description="The task's own fields, as its endpoint takes them.")
    priority: StrictInt = Field(default=DEFAULT_PRIORITY, ge=MIN_PRIORITY, le=MAX_PRIORITY)
    delay_s: StrictInt | None = Field(default=None, ge=0, le=MAX_DELAY_S)
    run_at: AwareDatetime | None = Field(
        default=None, description="ISO-8601 time with a timezone; not together with delay_s."
    )
    keys: list[Label] | None = Field(
        default=None,
        max_length=MAX_LABELS,
        description=f"Labels, as the key parameter of a single submit: up to {MAX_LABELS}, "
        f"each once, {GRAMMAR}.",
    )
    idempotency_key: StrictStr | None = Field(
        default=None,
        pattern=KEY_PATTERN,
        description="As the Idempotency-Key header of a single submit; unique within the body.",
    )

    @field_validator("keys")
    @classmethod
    def _each_label_once(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            try:
                labels_of(value)
            except LabelError as error:
                raise ValueError(f"{error.message}: {error.value!r}") from None
        return value


class TaskBatchCreate(BaseModel):
    """Tasks accepted together: all of them, or (on any invalid item) none."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tasks: list[TaskItemCreate] = Field(min_length=1, max_length=MAX_BULK_TASKS)


class TaskBatchPublic(BaseModel):
    """The accepted tasks in request order, each pending."""

    tasks: list[TaskPublic]


class TaskFilterBody(BaseModel):
    """The filter fields every operation by filter takes (retry, cancel). Strict: an
    unknown field, or a value of another type, is a 422."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: StrictStr | None = Field(
        default=None, min_length=1, max_length=TASK_NAME_LENGTH, description="Only this kind."
    )
    created_before: AwareDatetime | None = Field(
        default=None, description="Only tasks created before this ISO-8601 time with a timezone."
    )
    key: Label | None = Field(default=None, description=f"Only tasks with this label, {GRAMMAR}.")

    @field_validator("created_before", mode="before")
    @classmethod
    def _iso_time(cls, value: object) -> object:
        # Pydantic would also take a number as seconds since the epoch.
        if not (isinstance(value, str) and ISO_TIME_WITH_ZONE.fullmatch(value)):
            raise ValueError("Input should be an ISO-8601 time with a timezone")
        return value


class RetryFilterBody(TaskFilterBody):
    """Which of the caller's tasks ``POST /tasks/retry`` takes; ``{}``: every failed and
    cancelled one."""

    status: Literal["failed", "cancelled"] | None = Field(
        default=None, description="Only failed, or only cancelled, tasks; default both."
    )

    def selection(self, account: str) -> RetryFilter:
        statuses = (
            RETRIABLE_STATUSES if self.status is None else frozenset({TaskStatus(self.status)})
        )
        return RetryFilter(
            account=account,
            statuses=statuses,
            name=self.name,
            label=self.key,
            created_before=self.created_before,
        )


class RetryCountPublic(BaseModel):
    """What a retry by filter did."""

    model_config = ConfigDict(frozen=True)

    count: int = Field(description="Tasks taken back to pending by this call.")
    remaining: int = Field(
        description=(
            f"Tasks that still match: a call retries at most {MAX_RETRIES_PER_CALL}, "
            "oldest first; call again while this is above 0."
        )
    )


class ErrorMessage(BaseModel):
    """Body of every error except 422 (which lists the offending fields)."""

    detail: str


class Readiness(BaseModel):
    """Whether each dependency is usable; ``status`` is ``ok`` only when all are.

    ``database`` is ``ok`` when a write would succeed now (not merely a read); ``reason``
    (only when not ready) says what is wrong.
    """

    status: str
    database: str
    redis: str
    reason: str | None = None


class Liveness(BaseModel):
    status: str


class LimitPublic(BaseModel):
    """A limit in force; ``null`` means that dimension is not limited."""

    model_config = ConfigDict(frozen=True)

    rate_per_s: float | None = Field(description="Tasks released per second.")
    burst: int | None = Field(description="Bucket depth for the rate; null without a rate.")
    inflight: int | None = Field(description="Cap on tasks queued or running.")


class KeyStatus(BaseModel):
    """One limited key: the rule limiting it, and how many tasks sit at each stage."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(description="`cluster`, or `<scope>:<value>` such as `host:example.com`.")
    rule: str = Field(description="The rule as written (RELAY_LIMITS, or the shorthand).")
    limit: LimitPublic
    backlog: int = Field(description="Pending tasks of this key, waiting in the outbox.")
    inflight: int = Field(description="Tasks of this key queued or running.")
    dispatched_last_minute: int = Field(description="Tasks of this key queued in the last 60 s.")


class StatusTotals(BaseModel):
    """Every task, limited or not (only the caller's when API_KEYS is set)."""

    model_config = ConfigDict(frozen=True)

    pending: int
    inflight: int
    dispatched_last_minute: int


class RelayStatus(BaseModel):
    """Where the flow-control limits stand, counted from the database."""

    model_config = ConfigDict(frozen=True)

    account: str | None = Field(
        description="With API_KEYS set, every count covers only this account's tasks."
    )
    as_of: datetime
    cluster: KeyStatus | None = Field(description="The cluster rule, when one is set.")
    keys: list[KeyStatus] = Field(
        description="Per task name, account and host: every specific rule, and each value "
        "of a `*` rule with tasks pending, in flight or dispatched in the last minute."
    )
    totals: StatusTotals
    relays_alive: int | None = Field(
        default=None,
        description="Relays heartbeating now (GET /api/v1/nodes); null when Redis cannot "
        "be asked. With none, pending tasks stay pending.",
    )
    note: str | None = Field(
        default=None, description="Set when no relay is alive, or it cannot be told."
    )


class NodePublic(BaseModel):
    """One relay or worker process, from its heartbeats."""

    model_config = ConfigDict(frozen=True)

    id: str
    host: str
    pid: int
    started_at: datetime
    last_seen: datetime = Field(description="Its last heartbeat.")
    alive: bool = Field(
        description=f"Heartbeat within the last {ALIVE_WITHIN_S:g} s; a dead node stays "
        f"listed, false, for {FORGET_AFTER_S:g} s."
    )


class WorkerNodePublic(NodePublic):
    running: int = Field(description="Jobs it was running at its last heartbeat.")


class NodesPublic(BaseModel):
    """Every relay and worker process seen lately, oldest first."""

    model_config = ConfigDict(frozen=True)

    relays: list[NodePublic]
    workers: list[WorkerNodePublic]


class CancelFilterBody(TaskFilterBody):
    """Which of the caller's tasks ``POST /tasks/cancel`` takes; ``{}``: every pending,
    queued and running one."""

    status: Literal["pending", "queued", "running"] | None = Field(
        default=None, description="Only pending, queued or running tasks; default all three."
    )

    def selection(self, account: str) -> CancelFilter:
        statuses = (
            CANCELLABLE_STATUSES if self.status is None else frozenset({TaskStatus(self.status)})
        )
        return CancelFilter(
            account=account,
            statuses=statuses,
            name=self.name,
            label=self.key,
            created_before=self.created_before,
        )


class CancelCountPublic(BaseModel):
    """What a cancel by filter did."""

    model_config = ConfigDict(frozen=True)

    count: int = Field(description="Tasks cancelled by this call.")
    remaining: int = Field(
        description=(
            f"Tasks that still match: a call cancels at most {MAX_CANCELS_PER_CALL}, "
            "oldest first; call again while this is above 0."
        )
    )
    skipped: int = Field(
        description=(
            "Running side-effecting tasks that match but were left running (not counted in "
            "`remaining`): cancel with `?force=true` to interrupt them."
        )
    )


class TaskConflictPublic(TaskPublic):
    """A 409: the task as it stands, and why the request did not change it."""

    detail: str


# Limits (api.routes.limits). A pause lasts at most this long: a longer one is a mistake
# more often than an intent (delete the rule's tasks, or pause again).
MAX_PAUSE_S = 366 * 24 * 3600


def _checked_rate(value: str) -> str:
    """A rate as a rule writes it (``5/s``, ``300/m``, ``1/h``), above zero."""
    try:
        parse_rule(f"cluster rate={value}")
    except LimitRuleError:
        raise ValueError(f"rate {value[:40]!r} is not <N>/<s|m|h> with N above zero") from None
    return value


class LimitRulePublic(BaseModel):
    """One rule in force, or one pause, as every relay obeys it."""

    model_config = ConfigDict(frozen=True)

    scope: str = Field(description="cluster, task:<name>, account:<id>, host:<host>; * for each.")
    rate: str | None = Field(description="Tokens per second, minute or hour (`5/s`); null: none.")
    burst: int | None = Field(description="Depth of the bucket; null without a rate.")
    inflight: int | None = Field(description="Cap on tasks queued or running; null: none.")
    paused_until: datetime | None = Field(
        description="Nothing of the scope is released before this moment; null: not paused."
    )
    source: Literal["env", "api"] = Field(
        description="env: RELAY_LIMITS (or RELAY_RATE, ...) at start; api: set through the "
        "API, overriding the environment's rule of the scope until deleted."
    )


class LimitRulesPublic(BaseModel):
    model_config = ConfigDict(frozen=True)

    rules: list[LimitRulePublic]


class LimitRuleUpdate(BaseModel):
    """The whole rule for a scope: a setting left out is not limited (burst: 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rate: Annotated[StrictStr, AfterValidator(_checked_rate)] | None = Field(
        default=None, max_length=40, description="`<N>/<s|m|h>`, N above zero, e.g. `5/s`."
    )
    burst: StrictInt | None = Field(
        default=None, ge=1, le=1_000_000, description="Bucket depth, >= 1; needs rate."
    )
    inflight: StrictInt | None = Field(
        default=None, ge=1, le=1_000_000, description="Cap on tasks queued or running, >= 1."
    )

    @model_validator(mode="after")
    def _some_setting(self) -> LimitRuleUpdate:
        if self.burst is not None and self.rate is None:
            raise ValueError("burst needs a rate")
        if self.rate is None and self.inflight is None:
            raise ValueError("a rule needs rate or inflight (or both)")
        return self

    def limit(self) -> Limit:
        rate_per_s = None
        if self.rate is not None:
            rate_per_s = parse_rule(f"cluster rate={self.rate}").limit.rate_per_s
        return Limit(rate_per_s=rate_per_s, burst=self.burst or 1, inflight=self.inflight)


class LimitPauseBody(BaseModel):
    """How long to pause: until a moment, or for a number of seconds (one of them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    until: AwareDatetime | None = Field(
        default=None, description="An ISO-8601 time with a timezone, in the future."
    )
    for_s: float | None = Field(
        default=None, gt=0, le=MAX_PAUSE_S, allow_inf_nan=False, description="Seconds, > 0."
    )

    @field_validator("until", mode="before")
    @classmethod
    def _iso_time(cls, value: object) -> object:
        if value is not None and not (
            isinstance(value, str) and ISO_TIME_WITH_ZONE.fullmatch(value)
        ):
            raise ValueError("Input should be an ISO-8601 time with a timezone")
        return value

    @field_validator("for_s", mode="before")
    @classmethod
    def _number(cls, value: object) -> object:
        # Not a string or a boolean that pydantic would read as a number.
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError("Input should be a number of seconds")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> LimitPauseBody:
        if (self.until is None) == (self.for_s is None):
            raise ValueError("give exactly one of until and for_s")
        return self

    def paused_until(self, now: datetime) -> datetime:
        if self.until is not None:
            return self.until
        assert self.for_s is not None
        return now + timedelta(seconds=self.for_s)
