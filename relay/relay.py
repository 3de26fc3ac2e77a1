"""The relay loop: claim admitted outbox rows, enqueue them into ARQ, release the rows.

Each step follows the two-phase protocol in ``throttler.store.outbox``: one transaction selects
claimable rows, asks the queue room, the in-flight caps and the limiter which may go, and
leases those; then the tasks are enqueued, the ARQ job id naming the task and this
dispatch (``throttler.job_ids``); then a later transaction deletes the leased rows. Any
number of relays may run side by side.

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

A job must also reach ARQ before its moment, or ARQ would start it late, together with
the next ones. The handover lead (``plan.HANDOVER_LEAD_S``, stretched by ``plan.next_lead``
to twice what the relay's handovers take, the horizon with it) covers the claim's commit
and the enqueue; a handover that still runs late (a starved or stopped process) is
caught by the enqueue script, which adds no job whose moment is past (``relay.enqueue``).
The relay then asks the limiter again for those tasks (new tokens, after every grant so
far, a longer lead ahead), moves their queued_at under its lease, and enqueues them at
the new moments (``_hand_over``): a slow relay releases later, never faster. Dying in
between leaves the rows leased; once the lease lapses a relay claims and admits them
afresh.

Limits change at run time (PUT /limits, pauses: ``throttler.store.limits``). Each claim
reads the version of the rules set through the API (``max(limit_changes.id)``) inside
its transaction, after the claims' lock when it takes one, and on a new version reloads
the rows and rebuilds its rules, caps, policy and limiter before deciding anything: a
change that answered before the claim's lock is obeyed by that claim. Paused scopes are
left out of claims as keys out of tokens are, until the pause ends. A relay never sleeps
longer than ``LIMITS_CHECK_EVERY_S`` between claims, and a message on
``LIMITS_CHANNEL`` ends its sleep at once.

After each committed claim the relay offers what it decided with (blocked keys and their
next tokens, full caps, queue room) to ``relay.board``, which publishes it in the
background for the task views' ``waiting`` (throttler.waiting); a claim never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from datetime import datetime

from arq.connections import ArqRedis

from relay import metrics, plan
from relay.board import BoardPublisher, board_from, next_tokens
from relay.enqueue import BatchEnqueuer, JobSpec, Outcome
from relay.plan import Memory, Opening, Policy, Settlement, Snapshot
from throttler.errors import RECOVERABLE_ERRORS
from throttler.job_ids import Dispatch, moment_us, released_job_id
from throttler.limits import LimitKey, RuleSet
from throttler.limits_in_force import RulesInForce, in_force
from throttler.logs import fields
from throttler.models import utcnow
from throttler.retry import RELAY_STEP, Outage
from throttler.settings import Settings
from throttler.statuses import TaskStatus
from throttler.store.limits import Overrides
from throttler.store.outbox import ClaimedTask, Outbox, OutboxClaim
from throttler.throttle import (
    Admission,
    InflightCaps,
    LastDispatch,
    Limiter,
    has_rates,
    max_admissible,
)
from throttler.waiting import WaitingBoard

log = logging.getLogger("relay")

LOG_EVERY_S = 1.0
# Times a handover asks for new moments for jobs that came late before it leaves them to
# their lease (each time with a longer lead: twice what the last attempt took).
RETIME_ATTEMPTS = 5
# Steps in a row that must succeed before an outage counts as over.
STEPS_TO_RECOVER = 3
# The longest a relay sleeps between claims (each reads the limits' version): a change
# through the API is obeyed within this, even without its announcement.
LIMITS_CHECK_EVERY_S = 0.5


def _count_held_back(
    planned: plan.Plan, admission: Admission | None, *, queue_full: bool, paused: int
) -> None:
    """Count what this claim held back, by reason (relay.metrics.HELD_BACK)."""
    wanted = len(planned.claims) - len(planned.release_only)
    # The room never cuts what the claim selected (it selects no more than the room).
    capped = wanted - len(planned.candidates)
    refused = 0 if admission is None else len(planned.candidates) - len(admission.admitted)
    metrics.count_held_back(
        inflight=capped, queue_full=int(queue_full), rate=refused, paused=paused
    )


# The claim transaction the running coroutine is in (a handover's retime runs in none).
_OPEN_CLAIM: ContextVar[OutboxClaim | None] = ContextVar("open_claim", default=None)


@asynccontextmanager
async def _inside(claim: OutboxClaim) -> AsyncIterator[None]:
    token = _OPEN_CLAIM.set(claim)
    try:
        yield
    finally:
        _OPEN_CLAIM.reset(token)


def last_dispatch_within_claims(outside: LastDispatch) -> LastDispatch:
    """The limiter's ``last_dispatch``: read in the claim transaction it is asked from,
    else (a retime) by ``outside``.

    A claim asks the limiter while its transaction holds a connection, and maybe the
    claim lock that other relays' claims wait for in theirs: a second connection opened
    then may wait behind PgBouncer for a server connection that only those hold.
    """

    async def last_dispatch() -> float | None:
        claim = _OPEN_CLAIM.get()
        if claim is None:
            return await outside()
        latest = await claim.last_dispatch_at()
        return None if latest is None else latest.timestamp()

    return last_dispatch


def new_relay_id() -> str:
    """Name this relay ``hostname-pid-random`` (fits ``outbox.claimed_by``)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class EnqueueError(RuntimeError):
    """Some admitted tasks could not be handed to ARQ; their leases will lapse."""


# What a relay step may fail with and still be tried again: the database or Redis away,
# or some enqueues refused.
STEP_ERRORS: tuple[type[Exception], ...] = (*RECOVERABLE_ERRORS, EnqueueError)


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    """What one claim transaction leased, and when the relay should look again."""

    to_enqueue: tuple[ClaimedTask, ...]
    # When each task in ``to_enqueue`` may start: its token's moment, its queued_at.
    run_at: tuple[datetime, ...] = ()
    # When, on the relay's clock, another step is worth taking.
    next_step_at: datetime
    backlog: int | None = None
    # When the claim read its rows, on the relay's clock: the handover lead counts from here.
    read_at: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Handover:
    """What became of tasks handed to ARQ."""

    # Task ids in ARQ now (a task ARQ already held, a repeat after a crash, counts).
    enqueued: set[str] = field(default_factory=set)
    # Not added: their moments were past when the jobs reached Redis.
    late: tuple[ClaimedTask, ...] = ()
    errors: list[BaseException] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True, slots=True)
class _Handing:
    """A claimed batch on its way into ARQ."""

    batch: Batch
    task: asyncio.Task[Handover]


class Relay:
    """Move admitted tasks from the SQL outbox into ARQ until stopped.

    Rows whose tasks are in ARQ are deleted by the next claim transaction (or by one of
    their own when no claim is due soon): on SQLite every commit costs an fsync.
    ``clock`` is the relay's one clock: leases, cadences, wake-ups and logs.
    """

    def __init__(
        self,
        *,
        settings: Settings,
        outbox: Outbox,
        arq: ArqRedis,
        limiter: Limiter,
        clock: Callable[[], datetime] = utcnow,
        relay_id: str | None = None,
        limiter_for: Callable[[RuleSet], Limiter] | None = None,
    ) -> None:
        self.settings = settings
        self.outbox = outbox
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
        # Rebuilds the limiter when the rules change (None: keep ``limiter``, for tests).
        self._limiter_for = limiter_for
        # The rules of RELAY_LIMITS; those set through the API override them.
        self._env_rules = settings.limit_rules
        self._limits_version = 0
        self._limits_changed = asyncio.Event()
        self.in_force = RulesInForce(rules=self._env_rules)
        self._memory = Memory()
        metrics.SCOPE_RELEASES.top = settings.metrics_top_scopes
        self._configure(self._env_rules)
        # The handover lead of the next claim (``plan.next_lead``).
        self._lead_s = self.policy.handover_lead_s
        self._dispatched = 0
        self._retimed = 0
        self._window_started = self.clock()
        # Why pending tasks wait, as this relay's claims saw it (relay.board).
        self._board = BoardPublisher(redis=arq, relay_id=self.relay_id)
        # Keys out of tokens -> when their next token falls due (the limiter's clock).
        self._next_token: dict[LimitKey, datetime] = {}
        self._seen: Callable[[], WaitingBoard] | None = None

    def _configure(self, rules: RuleSet) -> None:
        """Derive everything the rules decide: caps, the claim policy, serialization."""
        self.rules = rules
        self.caps = InflightCaps(rules)
        self._scope_keys = metrics.ScopeKeys(rules)
        settings = self.settings
        # Rows worth locking per claim: about what the limiter can admit in one go
        # (selecting a hundred rows to admit two costs every step).
        claim_limit = settings.relay_batch_size
        admissible = max_admissible(rules, horizon_s=plan.RESERVE_AHEAD_S)
        if admissible is not None:
            claim_limit = min(claim_limit, admissible)
        self.policy = Policy(
            caps=self.caps,
            claim_limit=claim_limit,
            rated=has_rates(rules),
            poll_interval_s=settings.relay_poll_interval_s,
            sweep_every_s=settings.reconcile_interval_s,
        )
        # Claims that count in-flight tasks or queue room must take turns across relays.
        self._serialize = bool(self.caps) or bool(settings.relay_max_queue_depth)

    def _apply_limits(self, overrides: Overrides) -> None:
        """Obey the rules and pauses read at ``overrides.version`` from the next decision on.

        What the relay remembered of the old rules goes: keys it left out for want of
        tokens are asked again (under the new rates), and the paused keys are left out
        until their pauses end.
        """
        self._limits_version = overrides.version
        self.in_force = in_force(self._env_rules, overrides.rows)
        self._configure(self.in_force.rules)
        self._lead_s = max(self._lead_s, self.policy.handover_lead_s)
        if self._limiter_for is not None:
            self.limiter = self._limiter_for(self.rules)
        self._memory = Memory(
            blocked=self.in_force.paused_at(self.clock()),
            recover_due_at=self._memory.recover_due_at,
            sweep_due_at=self._memory.sweep_due_at,
        )
        self._next_token = {}
        log.info(
            "relay.limits_changed",
            extra=fields(
                relay=self.relay_id,
                version=overrides.version,
                rules="; ".join(rule.text for rule in self.rules.rules) or "-",
                paused=",".join(str(k) for k in self.in_force.paused_at(self.clock())) or "-",
            ),
        )

    async def _follow_limits(self, claim: OutboxClaim) -> bool:
        """Reload the rules if they changed since the last claim; whether they did."""
        if await claim.limits_version() == self._limits_version:
            return False
        self._apply_limits(await claim.limit_overrides())
        return True

    def limits_changed(self) -> None:
        """A limit changed (``LIMITS_CHANNEL``): end the current sleep, whatever it waits for."""
        self._limits_changed.set()

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
        outage = Outage(
            log,
            down_event="relay.unavailable",
            retry_event="relay.error",
            up_event="relay.recovered",
            successes_to_recover=STEPS_TO_RECOVER,
            relay=self.relay_id,
        )
        delays = RELAY_STEP.delays()
        while not self.stopping:
            # A wake from here on may announce work this step's claim does not see yet.
            self._woken.clear()
            try:
                next_step_at = await self.step()
            except STEP_ERRORS as error:
                # Rows this step leased and could not hand over come back when their
                # lease lapses: look for them on every step until the outage is over.
                self._memory = Memory(
                    blocked=self._memory.blocked, sweep_due_at=self._memory.sweep_due_at
                )
                delay_s = next(delays)
                outage.failed(error, retry_in_s=delay_s)
                await self._pause(delay_s)
                continue
            outage.succeeded()
            delays = RELAY_STEP.delays()
            # New work (or a freed slot) cuts the pause short, unless the cluster bucket
            # is what the relay waits for: then nothing could go any sooner.
            # Never longer than LIMITS_CHECK_EVERY_S: the next claim reads the limits.
            await self._pause(
                min(LIMITS_CHECK_EVERY_S, (next_step_at - self.clock()).total_seconds()),
                wakeable=not self._memory.cluster_blocked,
            )
        try:
            await self.flush()
        except STEP_ERRORS as error:
            # The rows stay leased; once the lease lapses a relay releases them.
            self._log_error(error)
        await self._board.close()
        log.info("relay.stopped", extra=fields(relay=self.relay_id))

    async def step(self) -> datetime:
        """Claim a batch and start handing it to ARQ; return when to step again.

        A batch is enqueued (each task at its moment) while the relay goes on to its next
        claim; the next step collects the outcome.
        """
        batch = await self.claim()
        previous, self._handing = self._handing, None
        if not batch.to_enqueue and previous is None and not self._dispatched:
            # Idle: the next dispatch log covers only the busy time after this.
            self._window_started = self.clock()
        if batch.to_enqueue:
            handed = asyncio.create_task(self._hand_over(batch))
            self._handing = _Handing(batch=batch, task=handed)
        failed = await self._settle(previous)
        pause_s = (batch.next_step_at - self.clock()).total_seconds()
        if self.stopping or pause_s > self.settings.relay_poll_interval_s:
            # Nothing due soon: finish this batch and release its rows now.
            await self.flush()
        if failed is not None:
            raise failed
        return batch.next_step_at

    async def claim(self) -> Batch:
        """Lease what queue room, in-flight caps and the limiter admit (one transaction)."""
        carried = list(self._unreleased)
        # Heard: this claim reads the version (or, spared, has nothing to obey it with).
        self._limits_changed.clear()
        opening = plan.begin(self._memory, now=self.clock(), carrying=bool(carried))
        self._memory = opening.memory
        if opening.may_skip_if_idle and await self.outbox.surely_idle():
            return Batch(to_enqueue=(), next_step_at=plan.idle_next_step_at(self.policy, opening))
        metrics.CLAIMS.inc()
        async with self.outbox.claiming() as claim, _inside(claim):
            if carried:
                # First, so that rows known to be in ARQ no longer count as in hand.
                await self.release(claim, carried)
            serialized = self._serialize
            if serialized:
                await claim.serialize()
            if await self._follow_limits(claim):
                if self._serialize and not serialized:
                    # The new rules brought a cap: take the lock, and read what changed
                    # while waiting for it.
                    await claim.serialize()
                    await self._follow_limits(claim)
                opening = replace(opening, memory=self._memory)
            settlement, read_at = await self._claim_in(claim, opening)
            backlog = await self._backlog(claim, opening, leased=len(settlement.to_lease))
        self._unreleased = self._unreleased[len(carried) :]
        if self._seen is not None:
            # Committed: publish what this claim decided with (in the background).
            keep_s = (settlement.next_step_at - self.clock()).total_seconds()
            self._board.offer(self._seen, keep_s=keep_s)
        return Batch(
            to_enqueue=settlement.to_lease,
            run_at=settlement.queued_at,
            next_step_at=settlement.next_step_at,
            backlog=backlog,
            read_at=read_at,
        )

    async def _claim_in(self, claim: OutboxClaim, opening: Opening) -> tuple[Settlement, datetime]:
        """Select, admit and lease inside the claim transaction; release finished rows.

        Returns the settlement and when the rows were read (on the relay's clock).
        """
        now = self.clock()
        room = await self._queue_room(claim, now=now)
        inflight = await claim.count_inflight_by_key(scopes=self.caps.scopes)
        selection = plan.select(self.policy, opening, now=now, room=room, inflight=inflight)
        self._memory = selection.memory
        claims: list[ClaimedTask] = []
        if selection.limit > 0:
            claims = await claim.select_claimable(
                limit=selection.limit,
                now=now,
                due_by=selection.due_by,
                excluding=selection.excluding,
                recover_lapsed=selection.recover_lapsed,
                sweep_strays=selection.sweep_strays,
            )
        snapshot = Snapshot(
            claims=claims, inflight=inflight, room=room, now=self.clock(), lead_s=self._lead_s
        )
        planned = plan.make_plan(self.policy, selection, snapshot)
        admission = None
        if planned.candidates:
            admission = await self.limiter.admit(planned.candidates, horizon_s=planned.horizon_s)
        settlement = plan.settle(
            self.policy, opening, selection, planned, admission=admission, now=self.clock()
        )
        paused = self.in_force.paused_at(self.clock())
        # The queue's room cut this claim short: less than a page, and it took all of it.
        cut_short = (
            room is not None
            and selection.limit < self.policy.claim_limit
            and len(claims) >= selection.limit
        )
        _count_held_back(planned, admission, queue_full=cut_short, paused=len(paused))
        self._memory = settlement.memory
        self._seen = self._board_of(
            room=room,
            inflight=inflight,
            admission=admission,
            to_lease=settlement.to_lease,
            paused=paused,
        )
        lease_s = self.settings.relay_claim_lease_s
        await claim.lease(
            claims=settlement.to_lease,
            queued_at=settlement.queued_at,
            relay_id=self.relay_id,
            lease_s=lease_s,
        )
        if planned.release_only:
            # Rows of tasks that already started or finished are released, not enqueued.
            finished = planned.release_only
            await claim.lease(
                claims=finished,
                queued_at=[now] * len(finished),
                relay_id=self.relay_id,
                lease_s=lease_s,
            )
            await self.release(claim, [c.outbox_id for c in finished])
        return settlement, snapshot.now

    def _board_of(
        self,
        *,
        room: int | None,
        inflight: Mapping[LimitKey, int],
        admission: Admission | None,
        to_lease: Sequence[ClaimedTask],
        paused: Mapping[LimitKey, datetime],
    ) -> Callable[[], WaitingBoard]:
        """What this claim decided with, for ``relay.board``: built only when published.

        The publisher builds at most a few boards a second, outside the claim, whatever
        the claim rate (a board of 1,000 leases under two caps costs about 0.4 ms).
        """
        blocked = self._memory.blocked
        if admission is not None and admission.blocked:
            self._next_token = {**self._next_token, **next_tokens(admission)}
        if self._next_token:
            self._next_token = {k: t for k, t in self._next_token.items() if k in blocked}
        next_token = self._next_token
        written_at = utcnow()

        def build() -> WaitingBoard:
            # Re-claimed queued tasks hold their slots already: they are in ``inflight``.
            holding = {c.task_id for c in to_lease if c.status is TaskStatus.QUEUED}
            admitted = admission.admitted if admission is not None else ()
            return board_from(
                relay_id=self.relay_id,
                written_at=written_at,
                blocked=blocked,
                next_token=next_token,
                caps=self.caps,
                inflight=inflight,
                occupying=[c for c in admitted if c.task_id not in holding],
                room=room,
                paused=paused,
            )

        return build

    async def _backlog(self, claim: OutboxClaim, opening: Opening, *, leased: int) -> int | None:
        """Rows left in the outbox, when a dispatch log is due (None: not counted)."""
        if (opening.started_at - self._window_started).total_seconds() < LOG_EVERY_S:
            return None
        return await claim.count_rows() - leased

    async def _queue_room(self, claim: OutboxClaim, *, now: datetime) -> int | None:
        """How many more tasks ARQ's queue may take (``RELAY_MAX_QUEUE_DEPTH``); None: no cap.

        Jobs in the queue plus rows leased to any relay (admitted, perhaps not yet
        enqueued; a row already enqueued counts twice until released, erring on the
        safe side). Claims take turns meanwhile, so relays never share the same room.
        """
        depth = self.settings.relay_max_queue_depth
        if not depth:
            return None
        in_queue = int(await self.arq.zcard(self.settings.arq_queue_name))
        return depth - in_queue - await claim.count_leased(now=now)

    async def enqueue(
        self, claims: Sequence[ClaimedTask], *, run_at: Sequence[datetime | None] = ()
    ) -> Handover:
        """Hand tasks to ARQ, each to start no earlier than its run_at.

        One Redis call for the batch. Under a rate limit a job whose run_at is past when
        it reaches Redis is not added: it comes back as late.
        """
        when = list(run_at) or [None] * len(claims)
        # No arguments: the worker reads the payload from the database. The job id names
        # the dispatch: the task's queued_at, which the lease just set to ``at`` (a task
        # already queued, re-claimed after a crash, keeps its own: the same job id).
        released: dict[datetime, int] = {}  # each moment in microseconds, converted once
        jobs = []
        for claim, at in zip(claims, when, strict=True):
            moment = claim.queued_at if claim.status is TaskStatus.QUEUED else at
            if moment is None:
                job_id = Dispatch.of(claim.task_id, queued_at=None).job_id
            else:
                us = released.get(moment)
                if us is None:
                    us = released[moment] = moment_us(moment)
                job_id = released_job_id(claim.task_id, us)
            jobs.append(JobSpec(job_id=job_id, function=claim.name, run_at=at))
        try:
            outcomes = await self._enqueuer.place(jobs, on_time=self.policy.rated)
        except RECOVERABLE_ERRORS as error:
            return Handover(errors=[error])
        late = tuple(c for c, o in zip(claims, outcomes, strict=True) if o is Outcome.LATE)
        enqueued = {
            c.task_id for c, o in zip(claims, outcomes, strict=True) if o is not Outcome.LATE
        }
        return Handover(enqueued=enqueued, late=late)

    async def _hand_over(self, batch: Batch) -> Handover:
        """Enqueue a claimed batch; give the jobs that came late new moments, and again.

        Each handover's duration stretches (or relaxes) the next claims' lead; a retime's
        lead is twice what the last attempt took. What is still late after
        ``RETIME_ATTEMPTS`` stays leased, and comes back once the lease lapses.
        """
        handed = await self.enqueue(batch.to_enqueue, run_at=batch.run_at)
        started = batch.read_at
        if started is None or not self.policy.rated:
            return handed
        took_s = (self.clock() - started).total_seconds()
        self._lead_s = plan.next_lead(self.policy, self._lead_s, handover_s=took_s)
        enqueued, late, errors = set(handed.enqueued), handed.late, list(handed.errors)
        lead_s = self._lead_s
        for _ in range(RETIME_ATTEMPTS):
            if not late or errors:
                break
            lead_s = plan.next_lead(self.policy, lead_s, handover_s=took_s)
            started = self.clock()
            try:
                handed = await self._retime(late, now=started, lead_s=lead_s)
            except RECOVERABLE_ERRORS as error:
                errors.append(error)
                break
            took_s = (self.clock() - started).total_seconds()
            enqueued |= handed.enqueued
            late = handed.late
            errors += handed.errors
        if late:
            metrics.LATE.inc(len(late))
            log.warning(
                "relay.late",
                extra=fields(relay=self.relay_id, count=len(late), lead_s=round(lead_s, 3)),
            )
        return Handover(enqueued=enqueued, late=late, errors=errors)

    async def _retime(
        self, late: Sequence[ClaimedTask], *, now: datetime, lead_s: float
    ) -> Handover:
        """New tokens and moments for late tasks; record them under the lease; enqueue.

        The new queued_at is written before the enqueue, so it never understates when a
        task may go (the drain floor reads it).
        """
        candidates = plan.retime_candidates(late, now=now, lead_s=lead_s)
        admission = await self.limiter.admit(
            candidates, horizon_s=plan.horizon_for(self.policy, lead_s)
        )
        retiming = plan.retime(late, admission)
        if not retiming.to_enqueue:
            # Refused (the buckets lent further ahead than the horizon): ask again.
            return Handover(late=retiming.refused)
        async with self.outbox.claiming() as claim:
            kept = await claim.retime(
                claims=retiming.to_enqueue,
                queued_at=retiming.queued_at,
                relay_id=self.relay_id,
                lease_s=self.settings.relay_claim_lease_s,
            )
        # The tasks' queued_at is now the new moment: their job ids must name it, or the
        # worker would take each job for a stale dispatch and start nothing.
        moving = [
            (replace(c, queued_at=at), at)
            for c, at in zip(retiming.to_enqueue, retiming.queued_at, strict=True)
            if c.outbox_id in kept
        ]
        self._retimed += len(moving)
        handed = await self.enqueue([c for c, _ in moving], run_at=[at for _, at in moving])
        # Rows another relay took meanwhile are its to enqueue: neither handed nor late.
        return Handover(
            enqueued=handed.enqueued, late=(*retiming.refused, *handed.late), errors=handed.errors
        )

    async def release(self, claim: OutboxClaim, outbox_ids: Sequence[int]) -> None:
        """Delete outbox rows whose tasks are in ARQ (in a transaction after the claim)."""
        await claim.release(relay_id=self.relay_id, outbox_ids=outbox_ids)

    async def flush(self) -> None:
        """Finish the batch being enqueued; release waiting rows in a transaction of their own."""
        current, self._handing = self._handing, None
        failed = await self._settle(current)
        if self._unreleased:
            releasing = list(self._unreleased)
            async with self.outbox.claiming() as claim:
                await self.release(claim, releasing)
            self._unreleased = self._unreleased[len(releasing) :]
        if failed is not None:
            raise failed

    async def _settle(self, handing: _Handing | None) -> EnqueueError | None:
        """Wait for a batch's enqueue; queue its rows for release; describe any failure."""
        if handing is None:
            return None
        handed = await handing.task
        enqueued, failures = handed.enqueued, handed.errors
        to_enqueue = handing.batch.to_enqueue
        self._unreleased.extend(c.outbox_id for c in to_enqueue if c.task_id in enqueued)
        self._count(len(enqueued), handing.batch.backlog)
        metrics.count_released(to_enqueue, enqueued, self._scope_keys)
        if failures:
            metrics.ENQUEUE_FAILURES.inc(len(failures))
        if not failures:
            return None
        first = failures[0]
        error = EnqueueError(
            f"{len(failures)} of {len(to_enqueue)} enqueues failed: {type(first).__name__}: {first}"
        )
        error.__cause__ = first
        return error

    def _log_error(self, error: BaseException) -> None:
        log.error(
            "relay.error",
            extra=fields(
                relay=self.relay_id,
                error=f"{type(error).__name__}: {error}".splitlines()[0],
                retry_in_s="-",
            ),
        )

    def _count(self, dispatched: int, backlog: int | None) -> None:
        self._dispatched += dispatched
        elapsed_s = (self.clock() - self._window_started).total_seconds()
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
                    blocked=",".join(sorted(str(key) for key in self._memory.blocked)[:5]) or "-",
                    # Jobs that reached Redis after their moments and were given new ones.
                    retimed=self._retimed,
                    relay=self.relay_id,
                ),
            )
        self._dispatched = 0
        self._retimed = 0
        self._window_started = self.clock()

    def wake(self) -> None:
        """Cut the current pause short: new work was announced, or a slot came free."""
        self._woken.set()

    async def _pause(self, seconds: float, *, wakeable: bool = False) -> None:
        """Sleep, but return at once on ``stop`` (and on ``wake`` when ``wakeable``)."""
        if seconds <= 0 or self._limits_changed.is_set():
            return
        waits = [self._stopping.wait(), self._limits_changed.wait()]
        if wakeable:
            waits.append(self._woken.wait())
        waiters = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
