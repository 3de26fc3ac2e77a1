"""One attempt of one task, from ``started`` to its recorded outcome.

The database, not ARQ, decides how an attempt ends: the start counts the attempt, the
task runs under our own timeout, and exactly one outcome follows: succeeded, failed, or
another attempt later. Both writes go through the worker's status writer, which commits
them together with other jobs' writes; each job still waits for its own commit.

Another attempt is never ARQ's own retry: that would re-queue the job straight into Redis,
past every limit. A ``retrying`` outcome (or ``requeued``, when the worker stops during
the attempt) puts the task back in the outbox in the outcome's transaction, with the
backoff as its ``run_at``, and the job ends normally; the relay releases the next attempt
under the limits as a new dispatch (a new ARQ job id, ``throttler.job_ids``). A start
takes only a task ``queued`` on the dispatch its job names, so a stale job starts nothing.
ARQ's own retry limit and timeout are only backstops set well above ours (see registry),
because when ARQ gives up it skips our code and the task would never reach a terminal
status.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from arq.worker import Retry
from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from throttler.errors import TRANSIENT_DB_ERRORS
from throttler.job_ids import Dispatch
from throttler.logs import fields
from throttler.models import utcnow
from throttler.statuses import EventKind
from throttler.store.attempts import Attempt, Outcome
from worker import metrics
from worker.taskkit.backoff import retry_delay_s
from worker.taskkit.backpressure import PushedBack, push_back, spares_try
from worker.taskkit.base import BlockingTask
from worker.taskkit.definition import TaskDefinition
from worker.taskkit.errors import Backpressure, PermanentError
from worker.taskkit.persist import retry_until_written
from worker.taskkit.resources import Resources
from worker.taskkit.status_writer import StatusWriterClosed

log = logging.getLogger(__name__)

# Why a start may not be written although the job could run later: the database is away,
# or the worker is stopping (its status writer closed).
_START_RETRIABLE: tuple[type[Exception], ...] = (*TRANSIENT_DB_ERRORS, StatusWriterClosed)


def describe(error: BaseException) -> str:
    """Render an exception as ``Type: message`` (some carry no message at all)."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _describe_validation(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in item['loc']) or 'value'}: {item['msg']}"
        for item in error.errors()
    )


async def run_task(
    definition: TaskDefinition,
    resources: Resources,
    *,
    task_id: str,
    dispatch: Dispatch | None = None,
    arq_try: int = 1,
    redis: Redis | None = None,
    aborted: Callable[[], bool] | None = None,
    due_at: float | None = None,
) -> None:
    """Run one attempt of the task ``task_id`` and record how it ended.

    ``dispatch`` is what the ARQ job id names (None: any dispatch of a queued task).
    ``arq_try`` is ARQ's count of deliveries, used only to back off while the database
    cannot even record the start. With ``redis``, a terminal outcome is announced there
    once committed (see throttler.finished). ``aborted`` says whether a cancellation of
    the job is an abort (the task was cancelled: throttler.aborts) rather than a stop.
    ``due_at`` (Unix time) is when the job became due in ARQ: the queue wait's start.
    """
    settings = resources.settings
    try:
        attempt = await resources.status.start(task_id=task_id, dispatch=dispatch)
    except _START_RETRIABLE as error:
        # Nothing ran yet, so this is no attempt: the dispatch the relay released is run
        # later, by ARQ's retry of the same job (the same id, so the start still matches),
        # rather than dropped. ARQ's retry is fine here because it only delays an
        # attempt the limits already released (never earlier than its release moment);
        # a new trip through the outbox would charge the limits twice for one attempt.
        # It backs off so that a long outage does not use up ARQ's tries (see registry).
        # A closed writer means the worker is stopping: another worker takes the job.
        defer_s = retry_delay_s(
            attempt=max(arq_try, 1),
            base_s=settings.worker_retry_backoff_s,
            max_s=settings.worker_retry_backoff_max_s,
        )
        log.warning(
            "task.start_failed",
            extra=fields(
                task_id=task_id, name=definition.name, defer_s=defer_s, error=describe(error)
            ),
        )
        raise Retry(defer=defer_s) from error
    if attempt is None:
        log.info(
            "task.skipped",
            extra=fields(
                task_id=task_id,
                name=definition.name,
                job=(dispatch or Dispatch(task_id=task_id)).job_id,
                # Final, back in the outbox, already running, or a later dispatch exists.
                reason="not queued on this dispatch",
            ),
        )
        return

    started = time.monotonic()
    if not attempt.orphaned:
        metrics.ATTEMPTS_STARTED.labels(definition.name).inc()
        if due_at is not None:
            metrics.QUEUE_WAIT.labels(definition.name).observe(max(0.0, time.time() - due_at))
    if attempt.orphaned:
        # ARQ delivered the job again: the worker running this attempt died (its lease
        # lapsed). Another attempt goes back through the outbox, as any other.
        ending = _Ending(definition=definition, resources=resources, attempt=attempt)
        await _record(
            definition, resources, attempt, ending.orphaned(), started=started, redis=redis
        )
        return
    # At INFO one line per attempt, its outcome (with attempt and duration); the start is
    # in task_events, and logging it too would cost a busy worker a tenth of its time.
    log.debug(
        "task.started",
        extra=fields(task_id=task_id, name=definition.name, attempt=attempt.attempt),
    )
    try:
        outcome = await _attempt(definition, resources, attempt, redis=redis)
    except asyncio.CancelledError:
        if aborted is not None and aborted():
            _log_aborted(definition, attempt, started=started)
            # The task is cancelled in the database already (the abort is sent after that
            # commit): nothing to record. ARQ ends the job as aborted, never re-run.
            raise
        # Otherwise a stopping worker cancelled the job (its drain, past the grace). The
        # attempt is cut short: the task goes back through the outbox (or fails, if
        # side-effecting) before the job goes back to ARQ, whose re-run of it then
        # starts nothing.
        ending = _Ending(definition=definition, resources=resources, attempt=attempt)
        await _record(
            definition, resources, attempt, ending.interrupted(), started=started, redis=redis
        )
        raise
    await _record(definition, resources, attempt, outcome, started=started, redis=redis)


def _log_aborted(definition: TaskDefinition, attempt: Attempt, *, started: float) -> None:
    blocking = isinstance(definition.task, BlockingTask)
    log.info(
        "task.interrupted",
        extra=fields(
            task_id=attempt.task_id,
            name=definition.name,
            attempt=attempt.attempt,
            duration_ms=round((time.monotonic() - started) * 1000),
            reason="cancelled",
            # A thread cannot be interrupted: it finishes its call, and its result is
            # dropped with the awaiting coroutine (the database would refuse it anyway).
            outcome="discarded; its thread runs on to the end" if blocking else "discarded",
        ),
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class _Ending:
    """Builds the outcome of one attempt (``throttler.store.attempts.Outcome``)."""

    definition: TaskDefinition
    resources: Resources
    attempt: Attempt

    def outcome(
        self,
        event: EventKind,
        *,
        result: dict[str, Any] | None = None,
        error: str | None = None,
        defer_s: float | None = None,
        reason: str | None = None,
        tries_base: int | None = None,
        now: datetime | None = None,
    ) -> Outcome:
        if event is EventKind.RETRYING and tries_base is None:
            tries_base = self.attempt.tries_base
        return Outcome(
            task_id=self.attempt.task_id,
            event=event,
            attempt=self.attempt.attempt,
            worker_id=self.resources.worker_id,
            now=now or utcnow(),
            result=result,
            error=error,
            defer_s=defer_s,
            reason=reason,
            tries_base=tries_base,
        )

    def succeeded(self, result: dict[str, Any]) -> Outcome:
        return self.outcome(EventKind.SUCCEEDED, result=result)

    def failed(self, error: str) -> Outcome:
        return self.outcome(EventKind.FAILED, error=error)

    def retriable(self, error: str) -> Outcome:
        """Another attempt later if the task allows one, else failed."""
        definition, attempt = self.definition, self.attempt
        if definition.at_most_once:
            return self.failed(f"{error} (side-effecting task: not retried)")
        if attempt.try_number >= definition.max_tries:
            return self.failed(f"{error} (gave up after {attempt.try_number} attempts)")
        settings = self.resources.settings
        defer_s = retry_delay_s(
            attempt=attempt.try_number,
            base_s=settings.worker_retry_backoff_s,
            max_s=settings.worker_retry_backoff_max_s,
        )
        return self.outcome(EventKind.RETRYING, error=error, defer_s=defer_s)

    def pushed_back(self, error: str, pushed: PushedBack) -> Outcome:
        """Back to the outbox until the pause ends, the try spared (worker.taskkit.backpressure)."""
        attempt = self.attempt
        if not spares_try(self.resources.settings, attempt):
            return self.retriable(f"{error} (past UPSTREAM_MAX_PUSHBACKS: counted as a try)")
        now = utcnow()
        return self.outcome(
            EventKind.RETRYING,
            error=error,
            # From the outcome's own moment: run_at is the pause's end exactly.
            defer_s=max((pushed.until - now).total_seconds(), 0.0),
            reason="upstream",
            tries_base=attempt.tries_base + 1,
            now=now,
        )

    def interrupted(self) -> Outcome:
        """The worker stopped during the attempt."""
        return self._cut_short("the worker stopped", reason="worker_stopping")

    def orphaned(self) -> Outcome:
        """The worker running the attempt died (ARQ delivered its job again)."""
        return self._cut_short("its worker was lost", reason="worker_lost")

    def _cut_short(self, what: str, *, reason: str) -> Outcome:
        """An attempt ended without an outcome: back to the outbox at once (no backoff),
        or failed if side-effecting (it may have had its effect)."""
        attempt = self.attempt.attempt
        if self.definition.at_most_once:
            return self.failed(
                f"{what} during attempt {attempt}: the outcome of the earlier attempt is "
                "unknown, so it is not run again (side-effecting task)"
            )
        return Outcome(
            task_id=self.attempt.task_id,
            event=EventKind.REQUEUED,
            attempt=attempt,
            worker_id=self.resources.worker_id,
            now=utcnow(),
            error=f"{what} during attempt {attempt}",
            reason=reason,
        )


async def _attempt(
    definition: TaskDefinition, resources: Resources, attempt: Attempt, *, redis: Redis | None
) -> Outcome:
    ending = _Ending(definition=definition, resources=resources, attempt=attempt)
    if attempt.name != definition.name:
        return ending.failed(
            f"task is a {attempt.name!r} but ran as ARQ function {definition.name!r}"
        )
    # Tries count from the task's last explicit retry (Attempt.try_number): a user who
    # retried a failed task asked for it to run again, side-effecting or not.
    if definition.at_most_once and attempt.try_number > 1:
        return ending.failed(
            f"side-effecting task started again (attempt {attempt.attempt}): the outcome of "
            "the earlier attempt is unknown, so it is not run again"
        )
    if attempt.try_number > definition.max_tries:
        # Earlier attempts were cut short (worker killed or shut down) without an outcome.
        return ending.failed(
            f"gave up: try {attempt.try_number} (attempt {attempt.attempt}) exceeds "
            f"max_tries {definition.max_tries}"
        )
    try:
        params = definition.input_model.model_validate(attempt.payload)
    except ValidationError as error:
        return ending.failed(f"invalid input: {_describe_validation(error)}")

    deadline = asyncio.timeout(definition.timeout_s)
    try:
        async with deadline:
            output = await definition.task.run(resources, params)
    except TimeoutError as error:
        if deadline.expired():
            return ending.failed(f"timed out after {definition.timeout_s:g}s")
        return ending.retriable(describe(error))
    except PermanentError as error:
        return ending.failed(describe(error))
    except Backpressure as error:
        try:
            pushed = await push_back(resources, attempt, error, redis=redis)
        except PermanentError as invalid:
            return ending.failed(describe(invalid))
        return ending.pushed_back(describe(error), pushed)
    except Exception as error:
        log.debug("task.exception", exc_info=True, extra=fields(task_id=attempt.task_id))
        return ending.retriable(describe(error))
    return _check_output(ending, output)


def _check_output(ending: _Ending, output: object) -> Outcome:
    definition = ending.definition
    if not isinstance(output, definition.output_model):
        return ending.failed(
            f"invalid output: expected {definition.output_model.__name__}, "
            f"got {type(output).__name__}"
        )
    # Round-trip through JSON mode: what is stored is exactly what the model accepts.
    assert isinstance(output, BaseModel)
    try:
        checked = definition.output_model.model_validate(output.model_dump(mode="json"))
    except ValidationError as error:
        return ending.failed(f"invalid output: {_describe_validation(error)}")
    return ending.succeeded(checked.model_dump(mode="json"))


async def _record(
    definition: TaskDefinition,
    resources: Resources,
    attempt: Attempt,
    outcome: Outcome,
    *,
    started: float,
    redis: Redis | None,
) -> None:
    """Write the outcome (retried until written) and log it."""
    changed = await retry_until_written(
        lambda: resources.status.finish(outcome, announce=redis),
        task_id=attempt.task_id,
        what=outcome.event.value,
        # finish sees its try through even when this job is cancelled meanwhile.
        shielded=False,
    )
    log_fields: dict[str, Any] = {
        "task_id": attempt.task_id,
        "name": definition.name,
        "attempt": attempt.attempt,
        "duration_ms": round((time.monotonic() - started) * 1000),
    }
    if changed:
        metrics.ATTEMPTS_FINISHED.labels(definition.name, outcome.event.value).inc()
        metrics.RUN_TIME.labels(definition.name).observe(time.monotonic() - started)
    if not changed:
        # The task is no longer running on this attempt: cancelled (an abort that did not
        # reach this worker), or recovered and perhaps running again elsewhere.
        log.info(
            "task.outcome_discarded",
            extra=fields(**log_fields, outcome=outcome.event.value, error=outcome.error),
        )
        return
    if outcome.event is EventKind.SUCCEEDED:
        log.info("task.succeeded", extra=fields(**log_fields, recorded=changed))
        return
    if outcome.event is EventKind.RETRYING:
        assert outcome.defer_s is not None
        # Back in the outbox (unless finished meanwhile, e.g. cancelled): the job ends
        # here, and the relay releases the next attempt under the limits.
        log.warning(
            "task.retrying",
            extra=fields(
                **log_fields,
                defer_s=round(outcome.defer_s, 3),
                error=outcome.error,
                recorded=changed,
            ),
        )
        return
    if outcome.event is EventKind.REQUEUED:
        log.warning("task.requeued", extra=fields(**log_fields, reason=outcome.reason))
        return
    log.warning("task.failed", extra=fields(**log_fields, error=outcome.error, recorded=changed))
