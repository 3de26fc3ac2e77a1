"""The relay step's decisions, pure: a snapshot in, a plan out; no I/O, no clock of its own.

A claim (``Relay.claim``) reads what it must from the database and Redis, and asks these
functions what to do with it, in four moments of one transaction:

1. ``begin``: which keys are still blocked, whether to look for lapsed leases and stray
   rows this time, and whether an idle look may spare the claim altogether.
2. ``select``: how many rows to claim and which keys to leave out, given the queue room,
   the in-flight counts and the blocked keys.
3. ``plan``: which claimed rows to ask the limiter about (each no sooner than its
   ``run_at`` and, under a rate limit, the handover lead), which are only released, and
   when to step again if the limiter is not asked.
4. ``settle``: from the limiter's admission, what to lease at which moment, which keys to
   leave out until when, and when to step again.

And after the enqueue, when it came late (``relay.enqueue``: a job whose moment was past
when it reached Redis is not added): ``next_lead`` stretches the handover lead to what
the handovers take, and ``retime_candidates`` / ``retime`` give the late tasks new
moments from the limiter (new tokens, after every grant so far, a lead ahead). A slow
relay so releases later, never faster: the old tokens go unused.

Every time here is on one clock, the relay's (``now``, passed in). The limiter answers on
its own clock, Redis ``TIME``, shared by every relay and authoritative for tokens: a
task's moment (``queued_at``, ARQ's defer) is the grant's Redis time plus its delay, so
dispatches follow the shared buckets exactly. Only durations cross from the limiter's
clock to the relay's: a key that has no token for ``wait_s`` is left out until the
relay's clock, read when the admission came back, plus ``wait_s`` (less half a horizon).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from throttler.limits import LimitKey
from throttler.statuses import TaskStatus
from throttler.store.outbox import ClaimedTask, Exclusions
from throttler.throttle import (
    CLUSTER_KEY,
    TAKE_AHEAD_LIMIT_S,
    Admission,
    Candidate,
    InflightCaps,
    new_candidate,
)

# How far ahead a claim takes tokens. The relay comes back after half of it, so a step
# may run that late without losing a token; queued_at is at most this far ahead of the
# commit that records it.
RESERVE_AHEAD_S = 0.5
# How often claims look for leases that lapsed (a dead relay's rows): a lease lasts
# RELAY_CLAIM_LEASE_S, so this adds at most a second to a recovery.
RECOVER_EVERY_S = 1.0
# Under a rate limit, how long after its claim a task may go at the earliest: longer than
# a claim's commit plus its enqueue take, so every job is in ARQ before its moment. The
# least lead: a relay whose handovers take longer stretches it (``next_lead``).
HANDOVER_LEAD_S = 0.1
# The most the lead may stretch to (a relay stopped for longer is late again, and retimes
# again). Tokens are taken that much further ahead (the horizon grows with the lead,
# ``horizon_for``), so queued_at may lie up to RESERVE_AHEAD_S plus this ahead of its
# commit.
MAX_LEAD_S = 5.0
# What share of the lead an on-time handover keeps when less would do: it shrinks back
# over a few dozen handovers rather than at once (a loaded machine stays loaded a while).
LEAD_DECAY = 0.9
# Before any step: every cadence is due.
LONG_AGO = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True, kw_only=True, slots=True)
class Policy:
    """What a relay's settings decide about its steps; fixed for the relay's life."""

    caps: InflightCaps
    # Rows worth locking per claim (batch size, or what the cluster rate admits at once).
    claim_limit: int
    # Whether any rule has a rate (then the handover lead applies).
    rated: bool
    poll_interval_s: float
    # How often to sweep the outbox for stray rows (the reconciler's pace).
    sweep_every_s: float
    reserve_ahead_s: float = RESERVE_AHEAD_S
    handover_lead_s: float = HANDOVER_LEAD_S
    recover_every_s: float = RECOVER_EVERY_S
    max_lead_s: float = MAX_LEAD_S


@dataclass(frozen=True, kw_only=True, slots=True)
class Memory:
    """What a relay carries from step to step, on its clock."""

    # Keys out of tokens (the limiter's answer) -> when they are worth asking again.
    blocked: Mapping[LimitKey, datetime] = field(default_factory=dict)
    recover_due_at: datetime = LONG_AGO
    sweep_due_at: datetime = LONG_AGO

    @property
    def cluster_blocked(self) -> bool:
        """Whether the cluster bucket is what the relay waits for (nothing goes sooner)."""
        return CLUSTER_KEY in self.blocked


@dataclass(frozen=True, kw_only=True, slots=True)
class Opening:
    """How a step starts: ``begin``'s answer."""

    memory: Memory
    started_at: datetime
    recover_lapsed: bool
    sweep_strays: bool
    # Nothing to release and no recovery due: a read-only look finding no pending task
    # may spare the claim (the relay then steps again after its poll interval).
    may_skip_if_idle: bool


@dataclass(frozen=True, kw_only=True, slots=True)
class Selection:
    """What to claim: ``select``'s answer (``limit`` 0: claim nothing)."""

    limit: int
    due_by: datetime
    excluding: Exclusions
    recover_lapsed: bool
    sweep_strays: bool
    memory: Memory


@dataclass(frozen=True, kw_only=True, slots=True)
class Snapshot:
    """What a claim found, for ``plan``."""

    claims: Sequence[ClaimedTask]
    inflight: Mapping[LimitKey, int]
    # How many more tasks ARQ's queue may take; None: no cap.
    room: int | None
    # When the claimed rows were read (the handover lead counts from here).
    now: datetime
    # The handover lead (``next_lead``); None: the policy's least.
    lead_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Plan:
    """What to do with the claimed rows: ``plan``'s answer."""

    # To ask the limiter about, in claim order, with their moments as POSIX seconds.
    candidates: tuple[Candidate, ...]
    # How far ahead to ask the limiter for tokens (``horizon_for`` the lead).
    horizon_s: float
    # Rows of tasks that already started or finished: leased and released, not enqueued.
    release_only: tuple[ClaimedTask, ...]
    # Whether a cap or the queue room left some claimed row out.
    capped: bool
    # A full page of claims: there may be more right now.
    full_page: bool
    # Every claimed row (the admission names candidates; the lease needs their rows).
    claims: tuple[ClaimedTask, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class Settlement:
    """What the admission means: ``settle``'s answer."""

    to_lease: tuple[ClaimedTask, ...]
    # When each task in ``to_lease`` may start, on the limiter's clock: its queued_at.
    queued_at: tuple[datetime, ...]
    memory: Memory
    next_step_at: datetime


def begin(memory: Memory, *, now: datetime, carrying: bool) -> Opening:
    """Forget blocks that ran out; decide whether this step recovers and sweeps."""
    recover = now >= memory.recover_due_at
    sweep = now >= memory.sweep_due_at
    blocked = {key: until for key, until in memory.blocked.items() if until > now}
    return Opening(
        memory=Memory(
            blocked=blocked, recover_due_at=memory.recover_due_at, sweep_due_at=memory.sweep_due_at
        ),
        started_at=now,
        recover_lapsed=recover,
        sweep_strays=sweep,
        may_skip_if_idle=not (carrying or recover or sweep),
    )


def idle_next_step_at(policy: Policy, opening: Opening) -> datetime:
    """When a relay whose claim was spared looks again (a wake-up may come sooner)."""
    return opening.started_at + timedelta(seconds=policy.poll_interval_s)


def select(
    policy: Policy,
    opening: Opening,
    *,
    now: datetime,
    room: int | None,
    inflight: Mapping[LimitKey, int],
) -> Selection:
    """How many rows to claim, due by when, leaving out blocked and full keys.

    The recovery and sweep cadences restart only when a claim is made (no room: none).
    """
    memory = opening.memory
    limit = policy.claim_limit if room is None else min(policy.claim_limit, max(room, 0))
    if limit > 0:
        memory = Memory(
            blocked=memory.blocked,
            recover_due_at=_next_due(
                opening.recover_lapsed, memory.recover_due_at, opening, policy.recover_every_s
            ),
            sweep_due_at=_next_due(
                opening.sweep_strays, memory.sweep_due_at, opening, policy.sweep_every_s
            ),
        )
    return Selection(
        limit=limit,
        due_by=now + timedelta(seconds=policy.reserve_ahead_s),
        excluding=Exclusions.of([*memory.blocked, *policy.caps.full(inflight)]),
        recover_lapsed=opening.recover_lapsed,
        sweep_strays=opening.sweep_strays,
        memory=memory,
    )


def _next_due(done: bool, due_at: datetime, opening: Opening, every_s: float) -> datetime:
    return opening.started_at + timedelta(seconds=every_s) if done else due_at


def make_plan(policy: Policy, selection: Selection, snapshot: Snapshot) -> Plan:
    """Which claimed rows to ask the limiter about, within the caps and the queue room.

    Re-claimed queued tasks (a lapsed lease) already hold their in-flight slots. Under a
    rate limit no task may go sooner than the handover lead from now: a task whose token
    fell due before its job reached ARQ would become runnable late, bunched with the next
    ones, and a window could then exceed rate·T + burst.
    """
    claims = snapshot.claims
    lead_s = policy.handover_lead_s if snapshot.lead_s is None else snapshot.lead_s
    earliest_s = snapshot.now.timestamp() + lead_s if policy.rated else None
    # One pass over the rows (a claim has up to a thousand).
    wanted: list[Candidate] = []
    holding: set[str] = set()
    release_only: list[ClaimedTask] = []
    for claim in claims:
        if not claim.needs_enqueue:
            release_only.append(claim)
            continue
        if claim.status == TaskStatus.QUEUED:
            holding.add(claim.task_id)
        wanted.append(_candidate(claim, earliest_s))
    candidates, capped = policy.caps.fit(
        wanted, snapshot.inflight, room=snapshot.room, holding=frozenset(holding)
    )
    return Plan(
        candidates=tuple(candidates),
        horizon_s=horizon_for(policy, lead_s),
        release_only=tuple(release_only),
        capped=capped,
        full_page=selection.limit > 0 and len(claims) == selection.limit,
        claims=tuple(claims),
    )


def settle(
    policy: Policy,
    opening: Opening,
    selection: Selection,
    planned: Plan,
    *,
    admission: Admission | None,
    now: datetime,
) -> Settlement:
    """What to lease at which moment, which keys to leave out until when, when to step again.

    ``admission`` is the limiter's answer about ``planned.candidates`` (None: not asked,
    there were none); ``now`` is the relay's clock when it came back. A key out of tokens
    is left out until half a horizon before its next token (half a horizon and the lead's
    stretch, when the horizon grew with the lead): late by up to that much, the next claim
    still takes it on time; meanwhile claims skip its tasks, so it holds back nothing else.
    """
    blocked = dict(selection.memory.blocked)
    to_lease: tuple[ClaimedTask, ...] = ()
    queued_at: tuple[datetime, ...] = ()
    if admission is not None:
        by_task = {claim.task_id: claim for claim in planned.claims}
        to_lease = tuple(by_task[candidate.task_id] for candidate in admission.admitted)
        queued_at = moments(admission)
        early = timedelta(seconds=planned.horizon_s - policy.reserve_ahead_s / 2)
        for key, wait_s in admission.blocked.items():
            blocked[key] = now + timedelta(seconds=wait_s) - early
    memory = Memory(
        blocked=blocked,
        recover_due_at=selection.memory.recover_due_at,
        sweep_due_at=selection.memory.sweep_due_at,
    )
    return Settlement(
        to_lease=to_lease,
        queued_at=queued_at,
        memory=memory,
        next_step_at=_next_step_at(policy, opening, planned, blocked),
    )


def _next_step_at(
    policy: Policy, opening: Opening, planned: Plan, blocked: Mapping[LimitKey, datetime]
) -> datetime:
    if CLUSTER_KEY in blocked:
        # Nothing at all may go before the cluster's next token.
        return blocked[CLUSTER_KEY]
    if planned.full_page and not planned.capped and planned.candidates:
        # A full page that went out (or taught us which keys to skip): there is likely
        # more right now.
        return opening.started_at
    poll_at = opening.started_at + timedelta(seconds=policy.poll_interval_s)
    return min([poll_at, *blocked.values()])


def next_lead(policy: Policy, lead_s: float, *, handover_s: float) -> float:
    """The handover lead after a handover that took ``handover_s`` (rows read to enqueued).

    Twice what it took, within the policy's least and most lead: it stretches at once
    when a handover runs long, and shrinks back by ``LEAD_DECAY`` per handover.
    """
    most_s = policy.max_lead_s
    wanted = min(most_s, max(policy.handover_lead_s, 2.0 * handover_s))
    if wanted >= lead_s:
        return wanted
    return min(most_s, max(wanted, lead_s * LEAD_DECAY))


def horizon_for(policy: Policy, lead_s: float) -> float:
    """How far ahead a claim (or a retime) with this lead takes tokens.

    The reserve horizon, stretched by as much as the lead is: a relay comes back half a
    horizon on, when the tokens it took still reach a lead past its next claim, so a
    longer lead loses no token (the bucket caps what it could hoard at the lead's moment).
    """
    stretched = policy.reserve_ahead_s + max(0.0, lead_s - policy.handover_lead_s)
    # Never past what a drain floor covers (throttle.restart_floor).
    return min(stretched, TAKE_AHEAD_LIMIT_S)


@dataclass(frozen=True, kw_only=True, slots=True)
class Retiming:
    """New moments for tasks whose jobs came late: ``retime``'s answer."""

    to_enqueue: tuple[ClaimedTask, ...]
    # Each task's new moment, on the limiter's clock: its new queued_at.
    queued_at: tuple[datetime, ...]
    # Refused by the limiter (its buckets lent further ahead than the horizon): to ask
    # again, still leased.
    refused: tuple[ClaimedTask, ...]


def retime_candidates(
    late: Sequence[ClaimedTask], *, now: datetime, lead_s: float
) -> tuple[Candidate, ...]:
    """Ask again for tasks whose jobs missed their moments, each a lead from ``now``."""
    earliest_s = now.timestamp() + lead_s
    return tuple(_candidate(claim, earliest_s) for claim in late)


def retime(late: Sequence[ClaimedTask], admission: Admission) -> Retiming:
    """The late tasks' new moments: their new tokens' (the old ones go unused)."""
    by_task = {claim.task_id: claim for claim in late}
    admitted = tuple(by_task[candidate.task_id] for candidate in admission.admitted)
    chosen = {claim.task_id for claim in admitted}
    return Retiming(
        to_enqueue=admitted,
        queued_at=moments(admission),
        refused=tuple(claim for claim in late if claim.task_id not in chosen),
    )


def moments(admission: Admission) -> tuple[datetime, ...]:
    """When each admitted candidate may go: its tokens fall due, it is due."""
    granted = datetime.fromtimestamp(admission.granted_at_s, UTC)
    # Delay -> moment: many candidates share a delay (none at all, or one lead).
    known: dict[float, datetime] = {}
    at: list[datetime] = []
    for delay_s in admission.ready_in_s:
        moment = known.get(delay_s)
        if moment is None:
            moment = known[delay_s] = granted + timedelta(seconds=delay_s)
        at.append(moment)
    return tuple(at)


def _candidate(claim: ClaimedTask, earliest_s: float | None) -> Candidate:
    run_at = claim.run_at
    not_before_s = earliest_s
    if run_at is not None:
        run_at_s = run_at.timestamp()
        not_before_s = run_at_s if earliest_s is None else max(run_at_s, earliest_s)
    return new_candidate(
        task_id=claim.task_id,
        name=claim.name,
        account=claim.account,
        host=claim.host,
        not_before_s=not_before_s,
        labels=claim.labels,
    )
