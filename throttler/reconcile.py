"""Recovery: put back in the outbox the tasks ARQ has lost, or that a dead worker holds.

The database is the source of truth and Redis holds only what can be rebuilt from it. A
task ``queued`` or ``running`` whose ARQ job is gone (no job or in-progress key: Redis
restarted empty, the job expired) would never finish; nor would a task still ``running``
well past its time limit (its worker died or hung and no worker took the job up again; a
live worker ends every attempt within the limit, see ``STUCK_MARGIN_S``). Each such task
goes back to ``pending`` with a new outbox row and a ``requeued`` event, so a relay
dispatches it again. A side-effecting task that may have started is not run again: it
ends ``failed`` with an error saying its outcome is unknown (at most once, SPEC
guarantee 4).

Safe with any number of relays each running a reconciler. A pass first reads candidates
without locks and checks Redis in one pipeline; only when something is to be done does it
open a write transaction (``RecoveryStore.recovering``), which locks the rows again under
the same conditions (another reconciler's locked rows are skipped), re-checks Redis, and
changes each task with a guarded write (same status, same attempt count, no outbox row,
still outside the grace period). A worker or relay transition that lands first wins; the
reconciler then leaves the task alone. This module decides; the store (throttler.store.
recovery) does the SQL.
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

from throttler.catalog import CATALOG, TaskSpec
from throttler.finished import publish_finished
from throttler.job_ids import Dispatch
from throttler.logs import fields
from throttler.models import utcnow
from throttler.periodic import Periodic
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.recovery import RecoveryCandidate, RecoveryStore

log = logging.getLogger("reconcile")

# Rows examined (and Redis keys checked, two per row) per transaction.
RECONCILE_BATCH_SIZE = 500
# How long past its time limit a ``running`` task counts as stuck. ARQ never ends our
# jobs on time: the worker gives ARQ a job timeout out of reach (a year,
# worker.taskkit.registry), and the task's own limit is enforced by our runner
# (worker.taskkit.runner), which then records ``failed``. So a live worker ends every
# attempt within the limit plus the time to record the outcome, which goes through the
# status writer's commit and is retried until written (worker.taskkit.persist): each try
# waits at most a few DATABASE_TIMEOUT_S (pool, connect, statement or lock
# timeouts), with a pause of at most a couple of seconds between tries. The margin is
# STUCK_MARGIN_DB_TIMEOUTS of those timeouts (about a dozen slow tries) plus
# STUCK_MARGIN_S for the rest: started_at is stamped before the start is committed and
# the limit's clock starts after it, the worker's and this host's clocks may differ, an
# event loop may stall. Requeueing a task whose worker is only slow would run it twice,
# so the margin errs long: a dead worker's task is still recovered, only later.
STUCK_MARGIN_S = 60.0
STUCK_MARGIN_DB_TIMEOUTS = 25
UNKNOWN_OUTCOME_ERROR = (
    "outcome unknown: this side-effecting task may have started (status {status}, "
    "{attempts} attempt(s)) but {why}; it is not run again"
)


class Reason(StrEnum):
    """Why a task is recovered; stored in the event's detail."""

    JOB_MISSING = "job_missing"  # no job or in-progress key in Redis (a result alone is lost)
    TIMED_OUT = "timed_out"  # running well past its time limit


@dataclass(frozen=True, kw_only=True, slots=True)
class ReconcileReport:
    """What one pass found and did."""

    examined: int = 0  # queued/running tasks outside the grace period, without outbox row
    requeued: tuple[str, ...] = ()  # back to pending with a new outbox row
    failed: tuple[str, ...] = ()  # side-effecting, may have started: failed, not re-run


@dataclass(frozen=True, kw_only=True, slots=True)
class _Action:
    candidate: RecoveryCandidate
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


def job_id(candidate: RecoveryCandidate) -> str:
    """The ARQ job id of the candidate's current dispatch (throttler.job_ids)."""
    return Dispatch.of(candidate.task_id, queued_at=candidate.queued_at).job_id


def _job_keys(job: str) -> tuple[str, str, str]:
    return (job_key_prefix + job, in_progress_key_prefix + job, result_key_prefix + job)


def _live_job_keys(job: str) -> tuple[str, str]:
    # A result key alone does not keep a queued or running task alive: our runner
    # records an outcome before its job ends, so ARQ finished the job without us (it
    # expired, failed before our code ran, or a re-delivery after its worker died found
    # the task running and started nothing) and the task is lost.
    return (job_key_prefix + job, in_progress_key_prefix + job)


async def _jobs_alive(redis: Redis, candidates: Sequence[RecoveryCandidate]) -> dict[str, bool]:
    """Return, per task, whether ARQ still holds its job, queued or running (one trip)."""
    if not candidates:
        return {}
    async with redis.pipeline(transaction=False) as pipe:
        for candidate in candidates:
            pipe.exists(*_live_job_keys(job_id(candidate)))
        counts = await pipe.execute()
    return {
        candidate.task_id: int(count) > 0
        for candidate, count in zip(candidates, counts, strict=True)
    }


def _decide(
    candidates: Sequence[RecoveryCandidate],
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
        # Attempts before an explicit retry ended (the user asked for another run).
        may_have_started = (
            candidate.status == TaskStatus.RUNNING or candidate.attempts > candidate.tries_base
        )
        actions.append(
            _Action(
                candidate=candidate,
                reason=Reason.TIMED_OUT if stuck else Reason.JOB_MISSING,
                fail=bool(spec and spec.side_effecting) and may_have_started,
            )
        )
    return actions


async def _forget_jobs(
    redis: Redis, *, candidates: Sequence[RecoveryCandidate], queue_name: str
) -> None:
    """Delete what ARQ still holds of requeued tasks' old jobs.

    The next dispatch has a job id of its own, and the old job would start nothing (its
    dispatch is no longer the task's); this only spares ARQ running it.
    """
    if not candidates:
        return
    async with redis.pipeline(transaction=False) as pipe:
        for candidate in candidates:
            job = job_id(candidate)
            pipe.delete(*_job_keys(job), retry_key_prefix + job)
            pipe.zrem(queue_name, job)
        await pipe.execute()


async def reconcile_once(
    *,
    store: RecoveryStore,
    redis: Redis,
    settings: Settings,
    now: datetime,
    grace_s: float | None = None,
    batch_size: int = RECONCILE_BATCH_SIZE,
    catalog: Mapping[str, TaskSpec] = CATALOG,
) -> ReconcileReport:
    """Recover every queued or running task whose ARQ job is lost or that is stuck.

    ``grace_s`` (default ``RELAY_CLAIM_LEASE_S``) leaves alone tasks queued or started
    more recently than that.
    """
    grace_cutoff = now - timedelta(
        seconds=settings.relay_claim_lease_s if grace_s is None else grace_s
    )
    examined = 0
    requeued: list[str] = []
    failed: list[str] = []
    after = ""
    while True:
        candidates = await store.candidates(
            grace_cutoff=grace_cutoff, after_task_id=after, limit=batch_size
        )
        if not candidates:
            break
        examined += len(candidates)
        after = candidates[-1].task_id
        alive = await _jobs_alive(redis, candidates)
        actions = _decide(candidates, alive, settings=settings, catalog=catalog, now=now)
        if actions:
            done, gave_up = await _apply(
                store, redis, actions, settings=settings, grace_cutoff=grace_cutoff, now=now
            )
            requeued.extend(done)
            failed.extend(gave_up)
        if len(candidates) < batch_size:
            break
    return ReconcileReport(examined=examined, requeued=tuple(requeued), failed=tuple(failed))


def _unknown_outcome_error(action: _Action) -> str:
    why = (
        "its ARQ job is gone"
        if action.reason is Reason.JOB_MISSING
        else "it is still running past its time limit"
    )
    return UNKNOWN_OUTCOME_ERROR.format(
        status=action.candidate.status.value, attempts=action.candidate.attempts, why=why
    )


async def _apply(
    store: RecoveryStore,
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
    forget: list[RecoveryCandidate] = []
    async with store.recovering(grace_cutoff=grace_cutoff, now=now) as unit:
        locked = {
            candidate.task_id
            for candidate in await unit.lock([action.candidate for action in actions])
        }
        actions = [action for action in actions if action.candidate.task_id in locked]
        # Re-check under the lock: a job may have appeared since the scan.
        alive = await _jobs_alive(
            redis, [a.candidate for a in actions if a.reason is Reason.JOB_MISSING]
        )
        for action in actions:
            task_id = action.candidate.task_id
            if alive.get(task_id, False):
                continue
            if action.fail:
                error = _unknown_outcome_error(action)
                if await unit.fail(action.candidate, reason=action.reason.value, error=error):
                    failed.append(task_id)
            elif await unit.requeue(action.candidate, reason=action.reason.value):
                requeued.append(task_id)
                forget.append(action.candidate)
        await _forget_jobs(redis, candidates=forget, queue_name=settings.arq_queue_name)
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
        store: RecoveryStore,
        redis: Redis,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        super().__init__(interval_s=settings.reconcile_interval_s, log=log)
        self.settings = settings
        self.store = store
        self.redis = redis
        self.clock = clock

    async def run_once(self) -> None:
        report = await reconcile_once(
            store=self.store, redis=self.redis, settings=self.settings, now=self.clock()
        )
        if report.requeued or report.failed:
            log.info(
                "reconcile.pass",
                extra=fields(
                    examined=report.examined,
                    requeued=len(report.requeued),
                    failed=len(report.failed),
                ),
            )
