"""Recovery: put back in the outbox the tasks ARQ has lost, or that a dead worker holds.

The database is the source of truth and Redis holds only what can be rebuilt from it. A
task ``queued`` or ``running`` whose ARQ job is gone (no job, in-progress or result key:
Redis restarted empty, the job expired) would never finish; so would a task still
``running`` well past its time limit (its worker died; ARQ would only retry it once the
in-progress marker lapses, an hour later for long tasks). Each such task goes back to
``pending`` with a new outbox row and a ``requeued`` event, so a relay dispatches it
again. A side-effecting task that may have started is not run again: it ends ``failed``
with an error saying its outcome is unknown (at most once, SPEC guarantee 4).

Safe with any number of relays each running a reconciler. A pass first reads candidates
without locks and checks Redis in one pipeline; only when something is to be done does it
open a write transaction, which locks the rows again (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL: another reconciler's rows are skipped) under the same conditions, re-checks
Redis, and changes each task with a guarded UPDATE (same status, same attempt count, no
outbox row, still outside the grace period). A worker or relay transition that lands
first wins; the reconciler then leaves the task alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from arq.constants import (
    in_progress_key_prefix,
    job_key_prefix,
    result_key_prefix,
    retry_key_prefix,
)
from redis.asyncio import Redis
from sqlalchemy import ColumnElement, and_, exists, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from throttler.catalog import CATALOG, TaskSpec
from throttler.db import SessionFactory
from throttler.finished import publish_finished
from throttler.logs import fields
from throttler.models import OutboxEntry, Task, TaskEvent, utcnow
from throttler.periodic import Periodic
from throttler.settings import Settings
from throttler.statuses import EventKind, TaskStatus

log = logging.getLogger("reconcile")

# Rows examined (and Redis keys checked, three per row) per transaction.
RECONCILE_BATCH_SIZE = 500
# Added to a task's time limit before a ``running`` task counts as stuck. It must exceed
# what the worker may still spend recording the outcome after the limit: ARQ's own
# timeout is the limit plus two retried database writes plus 30 s (worker.taskkit).
STUCK_MARGIN_S = 60.0
STUCK_MARGIN_DB_TIMEOUTS = 25
UNKNOWN_OUTCOME_ERROR = (
    "outcome unknown: this side-effecting task may have started (status {status}, "
    "{attempts} attempt(s)) but {why}; it is not run again"
)


class Reason(StrEnum):
    """Why a task is recovered; stored in the event's detail."""

    JOB_MISSING = "job_missing"  # no job, in-progress or result key in Redis
    TIMED_OUT = "timed_out"  # running well past its time limit


@dataclass(frozen=True, kw_only=True, slots=True)
class ReconcileReport:
    """What one pass found and did."""

    examined: int = 0  # queued/running tasks outside the grace period, without outbox row
    requeued: tuple[str, ...] = ()  # back to pending with a new outbox row
    failed: tuple[str, ...] = ()  # side-effecting, may have started: failed, not re-run


@dataclass(frozen=True, kw_only=True, slots=True)
class _Candidate:
    task_id: str
    name: str
    status: TaskStatus
    attempts: int
    started_at: datetime | None


@dataclass(frozen=True, kw_only=True, slots=True)
class _Action:
    candidate: _Candidate
    reason: Reason
    fail: bool  # True: side-effecting and may have started


def timeout_s(spec: TaskSpec | None, settings: Settings) -> float:
    """Return one attempt's time limit: the catalog's, else ``TASK_TIMEOUT_S``."""
    if spec is None or spec.timeout_s is None:
        return settings.task_timeout_s
    return spec.timeout_s


def stuck_after_s(spec: TaskSpec | None, settings: Settings) -> float:
    """Return how long after its start a ``running`` task counts as stuck."""
    margin_s = STUCK_MARGIN_S + STUCK_MARGIN_DB_TIMEOUTS * settings.database_timeout_s
    return timeout_s(spec, settings) + margin_s


def _job_keys(task_id: str) -> tuple[str, str, str]:
    return (job_key_prefix + task_id, in_progress_key_prefix + task_id, result_key_prefix + task_id)


def _live_job_keys(task_id: str) -> tuple[str, str]:
    # A result key alone does not keep a queued or running task alive: our runner
    # records an outcome before its job ends, so ARQ finished the job without us (it
    # expired, or failed before our code ran) and the task is lost. The result key must
    # then go too, or the relay's enqueue of the same job id would be a no-op.
    return (job_key_prefix + task_id, in_progress_key_prefix + task_id)


async def _jobs_alive(redis: Redis, task_ids: Sequence[str]) -> dict[str, bool]:
    """Return, per task, whether ARQ still holds its job, queued or running (one trip)."""
    if not task_ids:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for task_id in task_ids:
            pipe.exists(*_live_job_keys(task_id))
        counts = await pipe.execute()
    return {task_id: int(count) > 0 for task_id, count in zip(task_ids, counts, strict=True)}


def _eligible(*, grace_cutoff: datetime) -> ColumnElement[bool]:
    """Queued or running, outside the grace period, and holding no outbox row."""
    # A task with an outbox row is pending, or leased by a relay that may be enqueueing
    # it right now: the relay's lease covers it. queued_at may lie up to half a second
    # ahead (a relay reserving tokens), which the grace period absorbs.
    return and_(
        or_(
            and_(
                Task.status == TaskStatus.QUEUED,
                or_(Task.queued_at.is_(None), Task.queued_at < grace_cutoff),
            ),
            and_(
                Task.status == TaskStatus.RUNNING,
                or_(Task.started_at.is_(None), Task.started_at < grace_cutoff),
            ),
        ),
        ~exists().where(OutboxEntry.task_id == Task.id),
    )


async def _scan(
    session: AsyncSession, *, grace_cutoff: datetime, after: str, limit: int
) -> list[_Candidate]:
    rows = await session.execute(
        select(Task.id, Task.name, Task.status, Task.attempts, Task.started_at)
        .where(_eligible(grace_cutoff=grace_cutoff), Task.id > after)
        .order_by(Task.id)
        .limit(limit)
    )
    return [
        _Candidate(
            task_id=task_id,
            name=name,
            status=TaskStatus(status),
            attempts=attempts,
            started_at=started_at,
        )
        for task_id, name, status, attempts, started_at in rows
    ]


def _decide(
    candidates: Sequence[_Candidate],
    alive: Mapping[str, bool],
    *,
    settings: Settings,
    catalog: Mapping[str, TaskSpec],
    now: datetime,
) -> list[_Action]:
    actions = []
    for candidate in candidates:
        spec = catalog.get(candidate.name)
        stuck = (
            candidate.status == TaskStatus.RUNNING
            and candidate.started_at is not None
            and now - candidate.started_at > timedelta(seconds=stuck_after_s(spec, settings))
        )
        if alive[candidate.task_id] and not stuck:
            continue
        may_have_started = candidate.status == TaskStatus.RUNNING or candidate.attempts > 0
        actions.append(
            _Action(
                candidate=candidate,
                reason=Reason.TIMED_OUT if stuck else Reason.JOB_MISSING,
                fail=bool(spec and spec.side_effecting) and may_have_started,
            )
        )
    return actions


def _unchanged(candidate: _Candidate, *, grace_cutoff: datetime) -> ColumnElement[bool]:
    """The task is as the scan saw it: a worker or relay transition since then wins."""
    return and_(
        Task.id == candidate.task_id,
        Task.status == candidate.status,
        Task.attempts == candidate.attempts,
        _eligible(grace_cutoff=grace_cutoff),
    )


async def _lock(
    session: AsyncSession, actions: Sequence[_Action], *, grace_cutoff: datetime
) -> list[_Action]:
    """Lock the tasks still as scanned; on PostgreSQL skip those another reconciler holds."""
    rows = await session.execute(
        select(Task.id, Task.status, Task.attempts)
        .where(
            Task.id.in_([action.candidate.task_id for action in actions]),
            _eligible(grace_cutoff=grace_cutoff),
        )
        .with_for_update(of=Task, skip_locked=True)
    )
    seen = {task_id: (TaskStatus(status), attempts) for task_id, status, attempts in rows}
    return [
        action
        for action in actions
        if seen.get(action.candidate.task_id)
        == (action.candidate.status, action.candidate.attempts)
    ]


async def _requeue(
    session: AsyncSession, action: _Action, *, grace_cutoff: datetime, now: datetime
) -> bool:
    candidate = action.candidate
    changed = (
        await session.execute(
            update(Task)
            .where(_unchanged(candidate, grace_cutoff=grace_cutoff))
            .values(status=TaskStatus.PENDING, queued_at=None)
            .returning(Task.id)
        )
    ).one_or_none()
    if changed is None:
        return False
    await session.execute(insert(OutboxEntry).values(task_id=candidate.task_id, created_at=now))
    await session.execute(
        insert(TaskEvent).values(
            task_id=candidate.task_id,
            at=now,
            event=EventKind.REQUEUED,
            detail={
                "reason": action.reason.value,
                "previous_status": candidate.status.value,
                "attempt": candidate.attempts,
            },
        )
    )
    return True


async def _fail(
    session: AsyncSession, action: _Action, *, grace_cutoff: datetime, now: datetime
) -> bool:
    candidate = action.candidate
    why = (
        "its ARQ job is gone"
        if action.reason is Reason.JOB_MISSING
        else "it is still running past its time limit"
    )
    error = UNKNOWN_OUTCOME_ERROR.format(
        status=candidate.status.value, attempts=candidate.attempts, why=why
    )
    changed = (
        await session.execute(
            update(Task)
            .where(_unchanged(candidate, grace_cutoff=grace_cutoff))
            .values(status=TaskStatus.FAILED, error=error, finished_at=now)
            .returning(Task.id)
        )
    ).one_or_none()
    if changed is None:
        return False
    await session.execute(
        insert(TaskEvent).values(
            task_id=candidate.task_id,
            at=now,
            event=EventKind.FAILED,
            detail={
                "reason": action.reason.value,
                "previous_status": candidate.status.value,
                "attempt": candidate.attempts,
                "error": error,
            },
        )
    )
    return True


async def _forget_jobs(redis: Redis, *, task_ids: Sequence[str], queue_name: str) -> None:
    """Delete what ARQ still holds of requeued jobs, so the relay's enqueue is not a no-op."""
    if not task_ids:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for task_id in task_ids:
            pipe.delete(*_job_keys(task_id), retry_key_prefix + task_id)
            pipe.zrem(queue_name, task_id)
        await pipe.execute()


async def reconcile_once(
    *,
    sessions: SessionFactory,
    redis: Redis,
    settings: Settings,
    now: datetime,
    read_sessions: SessionFactory | None = None,
    grace_s: float | None = None,
    batch_size: int = RECONCILE_BATCH_SIZE,
    catalog: Mapping[str, TaskSpec] = CATALOG,
) -> ReconcileReport:
    """Recover every queued or running task whose ARQ job is lost or that is stuck.

    ``grace_s`` (default ``RELAY_CLAIM_LEASE_S``) leaves alone tasks queued or started
    more recently than that. ``read_sessions`` (``create_read_session_factory``) lets the
    scan run without SQLite's write lock; by default ``sessions`` is used for it too.
    """
    grace_cutoff = now - timedelta(
        seconds=settings.relay_claim_lease_s if grace_s is None else grace_s
    )
    readers = read_sessions or sessions
    examined = 0
    requeued: list[str] = []
    failed: list[str] = []
    after = ""
    while True:
        async with readers() as session:
            candidates = await _scan(
                session, grace_cutoff=grace_cutoff, after=after, limit=batch_size
            )
        if not candidates:
            break
        examined += len(candidates)
        after = candidates[-1].task_id
        alive = await _jobs_alive(redis, [c.task_id for c in candidates])
        actions = _decide(candidates, alive, settings=settings, catalog=catalog, now=now)
        if actions:
            done, gave_up = await _apply(
                sessions, redis, actions, settings=settings, grace_cutoff=grace_cutoff, now=now
            )
            requeued.extend(done)
            failed.extend(gave_up)
        if len(candidates) < batch_size:
            break
    return ReconcileReport(examined=examined, requeued=tuple(requeued), failed=tuple(failed))


async def _apply(
    sessions: SessionFactory,
    redis: Redis,
    actions: Sequence[_Action],
    *,
    settings: Settings,
    grace_cutoff: datetime,
    now: datetime,
) -> tuple[list[str], list[str]]:
    """Requeue or fail the tasks in one transaction; return the ids of each."""
    requeued: list[str] = []
    failed: list[str] = []
    async with sessions.begin() as session:
        actions = await _lock(session, actions, grace_cutoff=grace_cutoff)
        # Re-check under the lock: a job may have appeared since the scan.
        alive = await _jobs_alive(
            redis, [a.candidate.task_id for a in actions if a.reason is Reason.JOB_MISSING]
        )
        stale: list[str] = []
        for action in actions:
            task_id = action.candidate.task_id
            if alive.get(task_id, False):
                continue
            if action.fail:
                if await _fail(session, action, grace_cutoff=grace_cutoff, now=now):
                    failed.append(task_id)
            elif await _requeue(session, action, grace_cutoff=grace_cutoff, now=now):
                requeued.append(task_id)
                stale.append(task_id)
        # Before the commit: once the task is pending, a relay may enqueue it at once.
        await _forget_jobs(redis, task_ids=stale, queue_name=settings.arq_queue_name)
    # Committed: wake the API long-polls waiting on the tasks just failed.
    await publish_finished(redis, task_ids=failed)
    for task_id in requeued:
        log.warning("task.requeued", extra=fields(task_id=task_id))
    for task_id in failed:
        log.warning("task.failed_unknown_outcome", extra=fields(task_id=task_id))
    return requeued, failed


class Reconciler(Periodic):
    """Run ``reconcile_once`` every ``RECONCILE_INTERVAL_S`` until stopped."""

    name = "reconcile"

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: SessionFactory,
        redis: Redis,
        read_sessions: SessionFactory | None = None,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(interval_s=settings.reconcile_interval_s, log=log)
        self.settings = settings
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.redis = redis
        self.clock = clock
        self.last_report = ReconcileReport()

    async def run_once(self) -> None:
        report = await reconcile_once(
            sessions=self.sessions,
            redis=self.redis,
            settings=self.settings,
            now=self.clock(),
            read_sessions=self.read_sessions,
        )
        self.last_report = report
        if report.requeued or report.failed:
            log.info(
                "reconcile.pass",
                extra=fields(
                    examined=report.examined,
                    requeued=len(report.requeued),
                    failed=len(report.failed),
                ),
            )
