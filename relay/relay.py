"""The relay loop: claim admitted outbox rows, enqueue them into ARQ, release the rows.

Each step follows the two-phase protocol in ``throttler.outbox``: one transaction selects
claimable rows, asks the queue room, the in-flight caps and the limiter which may go, and
leases those; then the tasks are enqueued with their id as the ARQ job id; then a later
transaction deletes the leased rows. Any number of relays may run side by side.

Flow control without head-of-line blocking: a key (``task:``, ``account:``, ``host:``)
that is at its in-flight cap, or that the limiter found out of tokens, is left out of the
next claims until it has room again, so its backlog never holds back other tasks; and the
claim takes each account's next task in turn (``select_claimable``).

Between claims an idle relay sleeps ``RELAY_POLL_INTERVAL_S``, or less: ``wake`` (called
for each message on ``SUBMITTED_CHANNEL``, see ``throttler.wakeup``) ends the sleep as soon
as new work is committed. A batch goes to ARQ in one Redis call (``relay.enqueue``).

The limiter is asked with a horizon (``RESERVE_AHEAD_S``): it also admits tasks whose
tokens fall due within it, each with its own moment. The task is leased with that moment
as ``queued_at`` and enqueued at once, deferred in ARQ (``_defer_until``) to that moment.
So dispatches follow the token bucket exactly however slow a transaction or a busy event
loop is (an fsync-bound SQLite commit takes 10-30 ms, longer than a token at 50/s): a
relay only has to come back within the horizon.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from arq.connections import ArqRedis
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from relay.enqueue import BatchEnqueuer, JobSpec
from throttler.claim import ClaimedTask, Exclusions, any_pending, select_claimable
from throttler.db import SessionFactory
from throttler.limits import LimitKey
from throttler.logs import fields
from throttler.models import utcnow
from throttler.outbox import (
    count_inflight_by_key,
    count_leased,
    count_outbox,
    lease,
    lease_scheduled,
    release_claimed,
    serialize_claims,
)
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.throttle import (
    CLUSTER_KEY,
    Candidate,
    InflightCaps,
    Limiter,
    has_rates,
    max_admissible,
)

log = logging.getLogger("relay")

BACKOFF_MIN_S = 0.1
BACKOFF_MAX_S = 10.0
LOG_EVERY_S = 1.0
# Steps in a row that must succeed before an outage counts as over.
STEPS_TO_RECOVER = 3
# How far ahead a claim takes tokens. The relay comes back after half of it, so a step
# may run that late without losing a token; queued_at is at most this far ahead of the
# commit that records it.
RESERVE_AHEAD_S = 0.5
# How often claims look for leases that lapsed (a dead relay's rows): a lease lasts
# RELAY_CLAIM_LEASE_S, so this adds at most a second to a recovery.
RECOVER_EVERY_S = 1.0
# Under a rate limit, how long after its claim a task may go at the earliest: longer than
# a claim's commit plus its enqueue take, so every job is in ARQ before its moment.
HANDOVER_LEAD_S = 0.1


def new_relay_id() -> str:
    """Name this relay ``hostname-pid-random`` (fits ``outbox.claimed_by``)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class EnqueueError(RuntimeError):
    """Some admitted tasks could not be handed to ARQ; their leases will lapse."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    """What one claim transaction leased, and when the relay should look again."""

    to_enqueue: tuple[ClaimedTask, ...]
    # When each task in ``to_enqueue`` may start: its token's moment, its queued_at.
    run_at: tuple[datetime, ...] = ()
    # Loop time at which another step is worth taking.
    next_step_at: float
    backlog: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class _Handing:
    """A claimed batch on its way into ARQ."""

    batch: Batch
    task: asyncio.Task[tuple[set[str], list[BaseException]]]


class Relay:
    """Move admitted tasks from the SQL outbox into ARQ until stopped.

    Rows whose tasks are in ARQ are deleted by the next claim transaction (or by one of
    their own when no claim is due soon): on SQLite every commit costs an fsync.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        sessions: SessionFactory,
        arq: ArqRedis,
        limiter: Limiter,
        clock: Callable[[], datetime] = utcnow,
        relay_id: str | None = None,
        read_sessions: SessionFactory | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        # For a look at the outbox before taking SQLite's write lock (None: no look).
        self.read_sessions = read_sessions
        self.arq = arq
        self.limiter = limiter
        self.clock = clock
        self.relay_id = relay_id or new_relay_id()
        self._stopping = asyncio.Event()
        self._woken = asyncio.Event()
        self._enqueuer = BatchEnqueuer(redis=arq, queue_name=settings.arq_queue_name)
        # Outbox rows of tasks handed to ARQ (or needing no enqueue), not yet deleted.
        self._unreleased: list[int] = []
        self._handing: _Handing | None = None
        # Rows worth locking per claim: about what the limiter can admit in one go
        # (selecting a hundred rows to admit two costs every step).
        self.rules = settings.limit_rules
        self._claim_limit = settings.relay_batch_size
        admissible = max_admissible(self.rules, horizon_s=RESERVE_AHEAD_S)
        if admissible is not None:
            self._claim_limit = min(self._claim_limit, admissible)
        self.caps = InflightCaps(self.rules)
        self._rated = has_rates(self.rules)
        # Claims that count in-flight tasks or queue room must take turns across relays.
        self._serialize = bool(self.caps) or bool(settings.relay_max_queue_depth)
        # Keys out of tokens (limiter's answer) -> loop time they are worth asking again.
        self._blocked: dict[LimitKey, float] = {}
        self._dispatched = 0
        self._window_started = time.monotonic()
        # Loop times of the next look for lapsed leases and of the next sweep for stray
        # rows (a scan of the whole outbox, at the reconciler's pace): not every claim.
        self._recover_due_at = 0.0
        self._sweep_due_at = 0.0

    def stop(self) -> None:
        """Finish the batch in hand, then return from ``run``."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def run(self) -> None:
        """Relay until ``stop``; back off while the database or Redis fails.

        One ``relay.unavailable`` line when steps start failing and one
        ``relay.recovered`` line once a few steps in a row succeed again (a step with
        nothing to enqueue succeeds without Redis); the retries between them log at
        DEBUG, so an outage of an hour is two lines, not thousands.
        """
        log.info(
            "relay.started",
            extra=fields(
                relay=self.relay_id,
                rate_per_s=self.settings.relay_rate,
                burst=self.settings.relay_burst,
                max_inflight=self.settings.relay_max_inflight,
                limits=self.settings.relay_limits or "-",
                max_queue_depth=self.settings.relay_max_queue_depth,
            ),
        )
        backoff_s = BACKOFF_MIN_S
        failing_since: float | None = None
        good_steps = 0
        while not self.stopping:
            # A wake from here on may announce work this step's claim does not see yet.
            self._woken.clear()
            try:
                next_step_at = await self.step()
            except RECOVERABLE_ERRORS as error:
                good_steps = 0
                # Rows this step leased and could not hand over come back when their
                # lease lapses: look for them on every step until the outage is over.
                self._recover_due_at = 0.0
                if failing_since is None:
                    failing_since = time.monotonic()
                    self._log_error(error, retry_in_s=backoff_s, event="relay.unavailable")
                else:
                    self._log_error(error, retry_in_s=backoff_s, level=logging.DEBUG)
                await self._pause(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_MAX_S)
                continue
            good_steps += 1
            if failing_since is not None and good_steps >= STEPS_TO_RECOVER:
                log.warning(
                    "relay.recovered",
                    extra=fields(
                        relay=self.relay_id,
                        down_s=round(time.monotonic() - failing_since, 3),
                    ),
                )
                failing_since = None
            backoff_s = BACKOFF_MIN_S
            # New work (or a freed slot) cuts the pause short, unless the cluster bucket
            # is what the relay waits for: then nothing could go any sooner.
            await self._pause(
                next_step_at - asyncio.get_running_loop().time(),
                wakeable=CLUSTER_KEY not in self._blocked,
            )
        try:
            await self.flush()
        except RECOVERABLE_ERRORS as error:
            # The rows stay leased; once the lease lapses a relay releases them.
            self._log_error(error, retry_in_s=None)
        log.info("relay.stopped", extra=fields(relay=self.relay_id))

    async def step(self) -> float:
        """Claim a batch and start handing it to ARQ; return the loop time to step again.

        A batch is enqueued (each task at its moment) while the relay goes on to its next
        claim; the next step collects the outcome.
        """
        loop = asyncio.get_running_loop()
        batch = await self.claim()
        previous, self._handing = self._handing, None
        if not batch.to_enqueue and previous is None and not self._dispatched:
            # Idle: the next dispatch log covers only the busy time after this.
            self._window_started = time.monotonic()
        if batch.to_enqueue:
            handed = asyncio.create_task(self.enqueue(batch.to_enqueue, run_at=batch.run_at))
            self._handing = _Handing(batch=batch, task=handed)
        failed = await self._settle(previous)
        if self.stopping or batch.next_step_at - loop.time() > self.settings.relay_poll_interval_s:
            # Nothing due soon: finish this batch and release its rows now.
            await self.flush()
        if failed is not None:
            raise failed
        return batch.next_step_at

    async def claim(self) -> Batch:
        """Lease what queue room, in-flight caps and the limiter admit (one transaction)."""
        loop = asyncio.get_running_loop()
        settings = self.settings
        started_at = loop.time()
        next_step_at = started_at + settings.relay_poll_interval_s
        log_due = time.monotonic() - self._window_started >= LOG_EVERY_S
        carried = list(self._unreleased)
        to_enqueue: list[ClaimedTask] = []
        run_at: list[datetime] = []
        backlog = None
        self._blocked = {k: until for k, until in self._blocked.items() if until > started_at}
        recover = started_at >= self._recover_due_at
        sweep = started_at >= self._sweep_due_at
        if not (carried or recover or sweep) and await self._idle():
            return Batch(to_enqueue=(), next_step_at=next_step_at)
        async with self.sessions.begin() as session:
            if carried:
                # First, so that rows known to be in ARQ no longer count as in hand.
                await self.release(session, carried)
            if self._serialize:
                await serialize_claims(session)
            now = self.clock()
            room = await self._queue_room(session, now=now)
            inflight = await count_inflight_by_key(session, scopes=self.caps.scopes)
            full = self.caps.full(inflight)
            limit = self._claim_limit if room is None else min(self._claim_limit, max(room, 0))
            claims: list[ClaimedTask] = []
            if room is None or room > 0:
                claims = await select_claimable(
                    session,
                    limit=limit,
                    now=now,
                    due_by=now + timedelta(seconds=RESERVE_AHEAD_S),
                    excluding=Exclusions.of([*self._blocked, *full]),
                    recover_lapsed=recover,
                    sweep_strays=sweep,
                )
                if recover:
                    self._recover_due_at = started_at + RECOVER_EVERY_S
                if sweep:
                    self._sweep_due_at = started_at + settings.reconcile_interval_s
            # Re-claimed queued tasks (a lapsed lease) already hold their slots.
            holding = frozenset(c.task_id for c in claims if c.status == TaskStatus.QUEUED)
            candidates, capped = self.caps.fit(
                self._candidates(claims), inflight, room=room, holding=holding
            )
            admitted_any = False
            if candidates:
                admission = await self.limiter.admit(candidates, horizon_s=RESERVE_AHEAD_S)
                granted_at = loop.time()
                grant_time = datetime.fromtimestamp(admission.granted_at_s, UTC)
                by_task = {claim.task_id: claim for claim in claims}
                to_enqueue = [by_task[candidate.task_id] for candidate in admission.admitted]
                # queued_at is the moment the task may go: its tokens fall due, it is due.
                run_at = [grant_time + timedelta(seconds=d) for d in admission.ready_in_s]
                await lease_scheduled(
                    session,
                    claims=to_enqueue,
                    queued_at=run_at,
                    relay_id=self.relay_id,
                    lease_s=settings.relay_claim_lease_s,
                )
                admitted_any = bool(to_enqueue)
                for key, wait_s in admission.blocked.items():
                    # Come back half a horizon before the key's next token: late by up to
                    # that much, the next claim still takes it on time. Meanwhile claims
                    # skip the key's tasks, so it holds back nothing else.
                    self._blocked[key] = granted_at + wait_s - RESERVE_AHEAD_S / 2
            if CLUSTER_KEY in self._blocked:
                next_step_at = self._blocked[CLUSTER_KEY]
            elif (
                len(claims) == limit
                and limit > 0
                and not capped
                and (admitted_any or len(to_enqueue) < len(candidates))
            ):
                # A full page that went out (or taught us which keys to skip): there is
                # likely more right now.
                next_step_at = started_at
            elif self._blocked:
                next_step_at = min(next_step_at, min(self._blocked.values()))
            # Rows of tasks that already started or finished are released, not enqueued.
            finished = [claim for claim in claims if not claim.needs_enqueue]
            await lease(
                session,
                claims=finished,
                relay_id=self.relay_id,
                now=self.clock(),
                lease_s=settings.relay_claim_lease_s,
            )
            if finished:
                await self.release(session, [claim.outbox_id for claim in finished])
            if log_due:
                backlog = await count_outbox(session) - len(to_enqueue)
        self._unreleased = self._unreleased[len(carried) :]
        return Batch(
            to_enqueue=tuple(to_enqueue),
            run_at=tuple(run_at),
            next_step_at=next_step_at,
            backlog=backlog,
        )

    async def _idle(self) -> bool:
        """Whether a read-only look finds no pending task: then the claim is skipped.

        An idle relay polls many times a second; on SQLite each claim would hold the
        database's one write lock, which the API and the workers then wait for.
        """
        if self.read_sessions is None:
            return False
        async with self.read_sessions() as session:
            return not await any_pending(session)

    async def _queue_room(self, session: AsyncSession, *, now: datetime) -> int | None:
        """How many more tasks ARQ's queue may take (``RELAY_MAX_QUEUE_DEPTH``); None: no cap.

        Jobs in the queue plus rows leased to any relay (admitted, perhaps not yet
        enqueued; a row already enqueued counts twice until released, erring on the
        safe side). Claims take turns meanwhile, so relays never share the same room.
        """
        depth = self.settings.relay_max_queue_depth
        if not depth:
            return None
        in_queue = int(await self.arq.zcard(self.settings.arq_queue_name))
        return depth - in_queue - await count_leased(session, now=now)

    def _candidates(self, claims: Sequence[ClaimedTask]) -> list[Candidate]:
        """Limiter candidates for the claims that need an enqueue (finished ones do not).

        Under a rate limit no task may go sooner than ``HANDOVER_LEAD_S`` from now: a
        task whose token fell due before its job reached ARQ would become runnable late,
        bunched with the next ones, and a window could then exceed rate·T + burst.
        """
        earliest_s = time.time() + HANDOVER_LEAD_S if self._rated else None
        return [
            Candidate(
                task_id=claim.task_id,
                name=claim.name,
                account=claim.account,
                host=claim.host,
                not_before_s=_latest(
                    claim.run_at.timestamp() if claim.run_at else None, earliest_s
                ),
            )
            for claim in claims
            if claim.needs_enqueue
        ]

    async def enqueue(
        self, claims: Sequence[ClaimedTask], *, run_at: Sequence[datetime | None] = ()
    ) -> tuple[set[str], list[BaseException]]:
        """Hand tasks to ARQ (job id = task id), each to start no earlier than its run_at.

        One Redis call for the batch. Return the ids handed over (a task ARQ already
        held, a repeat after a crash, counts as handed over) and the errors.
        """
        when = list(run_at) or [None] * len(claims)
        # No arguments: the worker reads the payload from the database.
        jobs = [
            JobSpec(job_id=claim.task_id, function=claim.name, run_at=at)
            for claim, at in zip(claims, when, strict=True)
        ]
        try:
            await self._enqueuer.enqueue(jobs)
        except RECOVERABLE_ERRORS as error:
            return set(), [error]
        return {claim.task_id for claim in claims}, []

    async def release(self, session: AsyncSession, outbox_ids: Sequence[int]) -> None:
        """Delete outbox rows whose tasks are in ARQ (in a transaction after the claim)."""
        await release_claimed(session, relay_id=self.relay_id, outbox_ids=outbox_ids)

    async def flush(self) -> None:
        """Finish the batch being enqueued; release waiting rows in a transaction of their own."""
        current, self._handing = self._handing, None
        failed = await self._settle(current)
        if self._unreleased:
            releasing = list(self._unreleased)
            async with self.sessions.begin() as session:
                await self.release(session, releasing)
            self._unreleased = self._unreleased[len(releasing) :]
        if failed is not None:
            raise failed

    async def _settle(self, handing: _Handing | None) -> EnqueueError | None:
        """Wait for a batch's enqueue; queue its rows for release; describe any failure."""
        if handing is None:
            return None
        enqueued, failures = await handing.task
        to_enqueue = handing.batch.to_enqueue
        self._unreleased.extend(c.outbox_id for c in to_enqueue if c.task_id in enqueued)
        self._count(len(enqueued), handing.batch.backlog)
        if not failures:
            return None
        first = failures[0]
        error = EnqueueError(
            f"{len(failures)} of {len(to_enqueue)} enqueues failed: {type(first).__name__}: {first}"
        )
        error.__cause__ = first
        return error

    def _log_error(
        self,
        error: BaseException,
        *,
        retry_in_s: float | None,
        event: str = "relay.error",
        level: int = logging.ERROR,
    ) -> None:
        log.log(
            level,
            event,
            extra=fields(
                relay=self.relay_id,
                error=f"{type(error).__name__}: {error}".splitlines()[0],
                retry_in_s="-" if retry_in_s is None else retry_in_s,
            ),
        )

    def _count(self, dispatched: int, backlog: int | None) -> None:
        self._dispatched += dispatched
        elapsed_s = time.monotonic() - self._window_started
        if elapsed_s < LOG_EVERY_S:
            return
        if self._dispatched:
            log.info(
                "relay.dispatched",
                extra=fields(
                    count=self._dispatched,
                    rate_per_s=round(self._dispatched / elapsed_s, 2),
                    backlog="?" if backlog is None else backlog,
                    # Keys out of tokens right now, e.g. "host:a.example,task:download".
                    blocked=",".join(sorted(str(key) for key in self._blocked)[:5]) or "-",
                    relay=self.relay_id,
                ),
            )
        self._dispatched = 0
        self._window_started = time.monotonic()

    def wake(self) -> None:
        """Cut the current pause short: new work was announced, or a slot came free."""
        self._woken.set()

    async def _pause(self, seconds: float, *, wakeable: bool = False) -> None:
        """Sleep, but return at once on ``stop`` (and on ``wake`` when ``wakeable``)."""
        if seconds <= 0:
            return
        waits = [self._stopping.wait()]
        if wakeable:
            waits.append(self._woken.wait())
        waiters = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


def _latest(*moments_s: float | None) -> float | None:
    known = [moment for moment in moments_s if moment is not None]
    return max(known) if known else None


RECOVERABLE_ERRORS = (SQLAlchemyError, RedisError, OSError, TimeoutError, EnqueueError)
