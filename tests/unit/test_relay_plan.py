"""The relay step's pure decisions (``relay.plan``) on a fake clock, step after step.

A simulated relay drives ``begin`` / ``select`` / ``make_plan`` / ``settle`` against an
in-memory outbox and a limiter running ``throttle.decide`` on the same fake clock, while
tasks arrive and finish at random. Properties: in-flight caps and queue room are never
exceeded; a blocked key's pending tasks are never offered; the relay comes back no later
than its poll interval or the first blocked key's time (half a horizon before its token),
unless the cluster bucket itself is what it waits for; every moment respects the
handover lead and the task's ``run_at``; lapsed leases are looked for once per cadence.
Relays whose handovers run late have those jobs retimed (``next_lead``, ``retime``):
whatever the delays, what becomes runnable keeps every bucket.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay import plan
from relay.plan import Memory, Policy, Snapshot
from tests.memory_limiter import MemoryLimiter
from throttler.limits import LimitKey, RuleSet, Scope
from throttler.statuses import TaskStatus
from throttler.store.outbox import ClaimedTask, Exclusions
from throttler.throttle import (
    CLUSTER_KEY,
    Admission,
    Candidate,
    InflightCaps,
    has_rates,
    max_admissible,
)

START = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass(kw_only=True)
class Row:
    claim: ClaimedTask
    leased_until: datetime | None = None


@dataclass(kw_only=True)
class World:
    """The database and ARQ, as far as a claim sees them."""

    rows: dict[int, Row] = field(default_factory=dict)
    # Tasks in flight (queued or running): task id -> its candidate's keys.
    inflight: dict[str, ClaimedTask] = field(default_factory=dict)
    in_queue: int = 0
    serial: int = 0

    def submit(self, name: str, account: str, host: str | None, run_at: datetime | None) -> None:
        self.serial += 1
        self.rows[self.serial] = Row(
            claim=ClaimedTask(
                outbox_id=self.serial,
                task_id=f"t{self.serial}",
                name=name,
                account=account,
                host=host,
                status=TaskStatus.PENDING,
                run_at=run_at,
            )
        )

    def counts(self, caps: InflightCaps) -> dict[LimitKey, int]:
        counts: dict[LimitKey, int] = {}
        for claim in self.inflight.values():
            for key in caps.keys(_candidate(claim)):
                counts[key] = counts.get(key, 0) + 1
        return counts

    def select(self, *, limit: int, due_by: datetime, excluding: Exclusions) -> list[ClaimedTask]:
        """What ``select_claimable`` would take (in outbox order; no lapsed leases here)."""
        taken: list[ClaimedTask] = []
        for row in self.rows.values():
            claim = row.claim
            if len(taken) >= limit:
                break
            if row.leased_until is not None or excluding.everything:
                continue
            if claim.run_at is not None and claim.run_at > due_by:
                continue
            if (
                claim.name in excluding.names
                or claim.account in excluding.accounts
                or (claim.host is not None and claim.host in excluding.hosts)
            ):
                continue
            taken.append(claim)
        return taken


def _candidate(claim: ClaimedTask) -> Candidate:
    return Candidate(task_id=claim.task_id, name=claim.name, account=claim.account, host=claim.host)


def _keys_of(claim: ClaimedTask) -> set[LimitKey]:
    keys = {
        CLUSTER_KEY,
        LimitKey(scope=Scope.TASK, value=claim.name),
        LimitKey(scope=Scope.ACCOUNT, value=claim.account),
    }
    if claim.host is not None:
        keys.add(LimitKey(scope=Scope.HOST, value=claim.host))
    return keys


@st.composite
def rule_sets(draw: st.DrawFn) -> RuleSet:
    def rule(scope: str, *settings: str | None) -> str | None:
        chosen = [setting for setting in settings if setting is not None]
        return f"{scope} {' '.join(chosen)}" if chosen else None

    def maybe(setting: str) -> str | None:
        return setting if draw(st.booleans()) else None

    rate = draw(st.sampled_from([5, 20, 200]))
    download_rate = draw(st.sampled_from([1, 10]))
    parts = [
        rule(
            "cluster", maybe(f"rate={rate}/s burst=2"), maybe(f"inflight={draw(st.integers(1, 8))}")
        ),
        rule("account:*", maybe(f"inflight={draw(st.integers(1, 4))}")),
        rule("host:*", maybe("rate=2/s burst=1")),
        rule(
            "task:download",
            maybe(f"rate={download_rate}/s"),
            maybe(f"inflight={draw(st.integers(1, 3))}"),
        ),
    ]
    return RuleSet.parse("; ".join(part for part in parts if part is not None))


arrivals = st.lists(
    st.tuples(
        st.sampled_from(["greeting", "download"]),
        st.sampled_from(["a0", "a1", "a2"]),
        st.sampled_from(["h0", "h1"]),
        st.sampled_from([None, None, 0.2, 3.0]),  # run_at, seconds from now
    ),
    max_size=6,
)
steps_strategy = st.lists(
    st.tuples(
        arrivals,
        st.integers(0, 4),  # tasks that finish before the step
        st.sampled_from([0.0, 0.01, 0.1, 0.3, 1.0, 5.0]),  # seconds the relay comes back late
        st.booleans(),  # whether it comes back early (a wake-up) instead
        st.sampled_from([None, 0.1, 0.6, 2.0]),  # the handover lead (None: the least)
    ),
    min_size=1,
    max_size=30,
)


@given(
    rules=rule_sets(),
    depth=st.sampled_from([None, 3, 10]),
    batch=st.integers(1, 8),
    steps=steps_strategy,
)
@settings(max_examples=300, deadline=None)
def test_a_relay_driven_by_the_plan_keeps_every_limit(
    rules: RuleSet,
    depth: int | None,
    batch: int,
    steps: list[tuple[list[tuple[str, str, str, float | None]], int, float, bool, float | None]],
) -> None:
    caps = InflightCaps(rules)
    claim_limit = batch
    admissible = max_admissible(rules, horizon_s=plan.RESERVE_AHEAD_S)
    if admissible is not None:
        claim_limit = min(claim_limit, admissible)
    policy = Policy(
        caps=caps,
        claim_limit=claim_limit,
        rated=has_rates(rules),
        poll_interval_s=0.5,
        sweep_every_s=30.0,
    )
    limiter = MemoryLimiter(rules=rules)
    world = World()
    memory = Memory()
    now = START
    last_recover: datetime | None = None
    for arriving, finishing, late_s, woken, lead in steps:
        for name, account, host, run_in_s in arriving:
            run_at = None if run_in_s is None else now + timedelta(seconds=run_in_s)
            world.submit(name, account, host if name == "download" else None, run_at)
        for task_id in list(world.inflight)[:finishing]:
            del world.inflight[task_id]
            world.in_queue = max(0, world.in_queue - 1)

        opening = plan.begin(memory, now=now, carrying=False)
        assert all(until > now for until in opening.memory.blocked.values())
        inflight = world.counts(caps)
        room = None if depth is None else depth - world.in_queue
        selection = plan.select(policy, opening, now=now, room=room, inflight=inflight)
        if selection.limit > 0 and opening.recover_lapsed:
            if last_recover is not None:
                assert now - last_recover >= timedelta(seconds=policy.recover_every_s)
            last_recover = now
        # Every blocked or full key is left out of the claim.
        left_out = set(opening.memory.blocked) | caps.full(inflight)
        assert Exclusions.of(left_out) == selection.excluding
        claims = world.select(
            limit=selection.limit, due_by=selection.due_by, excluding=selection.excluding
        )
        snapshot = Snapshot(claims=claims, inflight=inflight, room=room, now=now, lead_s=lead)
        planned = plan.make_plan(policy, selection, snapshot)
        lead_s = policy.handover_lead_s if lead is None else lead
        # The horizon stretches with the lead, so the tokens reach a lead past the next claim.
        assert planned.horizon_s == pytest.approx(
            policy.reserve_ahead_s + lead_s - policy.handover_lead_s
        )
        # A blocked key's tasks are never offered.
        for candidate in planned.candidates:
            claim = next(c for c in claims if c.task_id == candidate.task_id)
            assert not _keys_of(claim) & set(opening.memory.blocked)
            if policy.rated:
                assert candidate.not_before_s is not None
                assert candidate.not_before_s >= now.timestamp() + lead_s
            if claim.run_at is not None:
                assert candidate.not_before_s is not None
                assert candidate.not_before_s >= claim.run_at.timestamp()
        admission = (
            limiter.admit_at(planned.candidates, now_s=now.timestamp(), horizon_s=planned.horizon_s)
            if planned.candidates
            else None
        )
        settlement = plan.settle(policy, opening, selection, planned, admission=admission, now=now)
        # Queue room is never exceeded.
        if room is not None:
            assert len(settlement.to_lease) <= max(room, 0)
        for claim, at in zip(settlement.to_lease, settlement.queued_at, strict=True):
            assert at >= now
            world.rows[claim.outbox_id].leased_until = at + timedelta(seconds=30)
            world.inflight[claim.task_id] = claim
            world.in_queue += 1
        # Caps are never exceeded.
        for key, count in world.counts(caps).items():
            cap = caps.cap(key)
            assert cap is None or count <= cap
        # Half a horizon before the next token, and the lead's stretch.
        early = timedelta(seconds=planned.horizon_s - policy.reserve_ahead_s / 2)
        if admission is not None:
            for key, wait_s in admission.blocked.items():
                assert settlement.memory.blocked[key] == now + timedelta(seconds=wait_s) - early
        blocked = settlement.memory.blocked
        if CLUSTER_KEY in blocked:
            assert settlement.next_step_at == blocked[CLUSTER_KEY]
        else:
            # Never later than the poll interval, nor than the next blocked key's time.
            poll = now + timedelta(seconds=policy.poll_interval_s)
            assert settlement.next_step_at <= min([poll, *blocked.values()])
            assert settlement.next_step_at >= now
        memory = settlement.memory
        # The relay comes back at its next step (a wake-up may bring it back sooner).
        comes_back = settlement.next_step_at if not woken else now
        now = max(now, comes_back) + timedelta(seconds=late_s)


def _claim(i: int, *, status: TaskStatus = TaskStatus.PENDING) -> ClaimedTask:
    return ClaimedTask(outbox_id=i, task_id=f"t{i}", name="greeting", account="a", status=status)


def _policy(**overrides: object) -> Policy:
    defaults: dict[str, object] = {
        "caps": InflightCaps(RuleSet(())),
        "claim_limit": 3,
        "rated": False,
        "poll_interval_s": 0.5,
        "sweep_every_s": 30.0,
    }
    return Policy(**{**defaults, **overrides})  # type: ignore[arg-type]


def test_a_full_page_that_went_out_steps_again_at_once() -> None:
    policy = _policy()
    opening = plan.begin(Memory(), now=START, carrying=False)
    selection = plan.select(policy, opening, now=START, room=None, inflight={})
    claims = [_claim(i) for i in range(3)]
    planned = plan.make_plan(
        policy, selection, Snapshot(claims=claims, inflight={}, room=None, now=START)
    )
    admission = Admission(
        admitted=planned.candidates, ready_in_s=(0.0,) * 3, granted_at_s=START.timestamp()
    )
    settled = plan.settle(policy, opening, selection, planned, admission=admission, now=START)
    assert settled.next_step_at == START
    assert settled.to_lease == tuple(claims)
    assert settled.queued_at == (START,) * 3
    # A page short of the limit: the backlog is empty, come back after the poll interval.
    short = plan.make_plan(
        policy, selection, Snapshot(claims=claims[:2], inflight={}, room=None, now=START)
    )
    settled = plan.settle(policy, opening, selection, short, admission=None, now=START)
    assert settled.next_step_at == START + timedelta(seconds=0.5)


def test_finished_rows_are_only_released_and_queued_ones_hold_their_slots() -> None:
    policy = _policy(caps=InflightCaps(RuleSet.parse("cluster inflight=1")))
    inflight = {CLUSTER_KEY: 1}
    opening = plan.begin(Memory(), now=START, carrying=False)
    selection = plan.select(policy, opening, now=START, room=None, inflight=inflight)
    assert selection.excluding.everything
    claims = [_claim(1, status=TaskStatus.SUCCEEDED), _claim(2, status=TaskStatus.QUEUED)]
    planned = plan.make_plan(
        policy, selection, Snapshot(claims=claims, inflight=inflight, room=None, now=START)
    )
    assert planned.release_only == (claims[0],)
    # A re-claimed queued task already holds its slot: it fits although the cap is full.
    assert [c.task_id for c in planned.candidates] == ["t2"]


def test_cadences_restart_only_when_a_claim_is_made() -> None:
    policy = _policy()
    opening = plan.begin(Memory(), now=START, carrying=False)
    assert opening.recover_lapsed
    assert opening.sweep_strays
    assert not opening.may_skip_if_idle
    no_room = plan.select(policy, opening, now=START, room=0, inflight={})
    assert no_room.limit == 0
    assert no_room.memory.recover_due_at == Memory().recover_due_at
    claimed = plan.select(policy, opening, now=START, room=5, inflight={})
    assert claimed.limit == 3
    later = START + timedelta(seconds=0.5)
    again = plan.begin(claimed.memory, now=later, carrying=False)
    assert not again.recover_lapsed
    assert not again.sweep_strays
    assert again.may_skip_if_idle
    assert not plan.begin(claimed.memory, now=later, carrying=True).may_skip_if_idle
    assert plan.begin(
        claimed.memory, now=START + timedelta(seconds=1), carrying=False
    ).recover_lapsed


def test_a_block_lapses_half_a_horizon_before_the_token() -> None:
    host = LimitKey(scope=Scope.HOST, value="h0")
    policy = _policy(rated=True)
    opening = plan.begin(Memory(), now=START, carrying=False)
    selection = plan.select(policy, opening, now=START, room=None, inflight={})
    planned = plan.make_plan(
        policy, selection, Snapshot(claims=[_claim(1)], inflight={}, room=None, now=START)
    )
    (candidate,) = planned.candidates
    assert candidate.not_before_s == pytest.approx(START.timestamp() + plan.HANDOVER_LEAD_S)
    # The limiter's clock runs 2 s ahead of the relay's: only durations cross over.
    granted = START + timedelta(seconds=2)
    admission = Admission(
        admitted=(candidate,),
        ready_in_s=(0.1,),
        blocked={host: 3.0},
        granted_at_s=granted.timestamp(),
    )
    settled = plan.settle(policy, opening, selection, planned, admission=admission, now=START)
    assert settled.queued_at == (granted + timedelta(seconds=0.1),)
    assert settled.memory.blocked == {host: START + timedelta(seconds=3.0 - 0.25)}
    assert settled.next_step_at == START + timedelta(seconds=0.5)
    # Once its time passes, the key is asked again.
    after = plan.begin(settled.memory, now=START + timedelta(seconds=2.75), carrying=False)
    assert after.memory.blocked == {}


@given(
    lead_s=st.floats(0.0, 10.0),
    handover_s=st.floats(0.0, 10.0),
    most_s=st.sampled_from([0.25, 2.0]),
)
def test_the_lead_stretches_to_twice_a_handover_within_its_bounds(
    lead_s: float, handover_s: float, most_s: float
) -> None:
    policy = _policy(rated=True, max_lead_s=most_s)
    lead = plan.next_lead(policy, lead_s, handover_s=handover_s)
    assert policy.handover_lead_s <= lead <= most_s
    wanted = min(most_s, max(policy.handover_lead_s, 2 * handover_s))
    # Never short of twice the handover (up to the bound) ...
    assert lead >= wanted
    # ... and it shrinks back gradually when less would do.
    if wanted < lead_s:
        assert lead >= min(most_s, lead_s * plan.LEAD_DECAY)


def _feasible(moments: list[float], *, rate: float, burst: int) -> bool:
    """Whether a token bucket (full at first) could have released at these moments.

    Moments are datetimes (microseconds) turned to POSIX floats: a few microseconds
    of slack.
    """
    tokens, last = float(burst), None
    slack = rate * 4e-6
    for moment in sorted(moments):
        if last is not None:
            tokens = min(float(burst), tokens + (moment - last) * rate)
        tokens -= 1.0
        last = moment
        if tokens < -slack:
            return False
    return True


@given(
    rate=st.sampled_from([5.0, 20.0, 300.0]),
    burst=st.sampled_from([1, 3]),
    download_rate=st.sampled_from([None, 2.0]),
    # Per claim: which relay, seconds since the previous claim, how long its handover
    # takes, and how long each retime of it takes.
    claims=st.lists(
        st.tuples(
            st.integers(0, 2),
            st.sampled_from([0.0, 0.05, 0.25, 0.6]),
            st.sampled_from([0.01, 0.05, 0.3, 1.0, 3.0]),
            st.sampled_from([0.01, 0.2, 2.0, 8.0]),
        ),
        min_size=1,
        max_size=25,
    ),
)
@settings(max_examples=200, deadline=None)
def test_late_handovers_are_retimed_so_releases_keep_the_buckets(
    rate: float,
    burst: int,
    download_rate: float | None,
    claims: list[tuple[int, float, float, float]],
) -> None:
    """Relays that hand over late, each by its own delay: what becomes runnable when.

    A job reaching ARQ after its moment is not added (the enqueue script); it is retimed
    from the limiter on the same fake clock. Whatever the delays, the runnable moments
    of every bucket are a token bucket's, and a retimed job goes a lead after its retime.
    """
    text = f"cluster rate={rate:g}/s burst={burst}"
    if download_rate is not None:
        text += f"; task:download rate={download_rate:g}/s"
    rules = RuleSet.parse(text)
    policy = _policy(rated=True)
    limiter = MemoryLimiter(rules=rules)
    world = World()
    for i in range(len(claims) * 4):
        world.submit(("greeting", "download")[i % 2], "a", None, None)
    runnable: dict[str, float] = {}
    leads = [policy.handover_lead_s] * 3
    # (time, relay, tasks, their moments, handover or retime duration, attempt) to resolve.
    handovers: list[tuple[float, int, tuple[ClaimedTask, ...], tuple[datetime, ...], int]] = []
    now = START
    for relay, gap_s, handover_s, retime_s in claims:
        now += timedelta(seconds=gap_s)
        # Resolve every handover that completes before this claim, in time order.
        handovers.sort(key=lambda h: h[0])
        while handovers and handovers[0][0] <= now.timestamp():
            _resolve(handovers.pop(0), policy, limiter, runnable, leads, handovers, retime_s)
        rows = [row for row in world.rows.values() if row.leased_until is None][:4]
        lead_s = leads[relay]
        candidates = [
            Candidate(
                task_id=r.claim.task_id,
                name=r.claim.name,
                account="a",
                not_before_s=now.timestamp() + lead_s,
            )
            for r in rows
        ]
        admission = limiter.admit_at(
            candidates, now_s=now.timestamp(), horizon_s=plan.horizon_for(policy, lead_s)
        )
        admitted = {c.task_id for c in admission.admitted}
        batch = tuple(r.claim for r in rows if r.claim.task_id in admitted)
        for row in rows:
            if row.claim.task_id in admitted:
                row.leased_until = now
        moments = plan.moments(admission)
        done_s = now.timestamp() + handover_s
        leads[relay] = plan.next_lead(policy, lead_s, handover_s=handover_s)
        handovers.append((done_s, relay, batch, moments, 0))
    handovers.sort(key=lambda h: h[0])
    while handovers:
        _resolve(handovers.pop(0), policy, limiter, runnable, leads, handovers, 0.01)
        handovers.sort(key=lambda h: h[0])

    assert _feasible(list(runnable.values()), rate=rate, burst=burst)
    if download_rate is not None:
        downloads = [at for task_id, at in runnable.items() if int(task_id[1:]) % 2 == 0]
        assert _feasible(downloads, rate=download_rate, burst=1)


def _resolve(
    handover: tuple[float, int, tuple[ClaimedTask, ...], tuple[datetime, ...], int],
    policy: Policy,
    limiter: MemoryLimiter,
    runnable: dict[str, float],
    leads: list[float],
    handovers: list[tuple[float, int, tuple[ClaimedTask, ...], tuple[datetime, ...], int]],
    retime_s: float,
) -> None:
    """The jobs reach Redis at ``done_s``: on time, runnable at their moments; late: retimed."""
    done_s, relay, batch, moments, attempt = handover
    late = []
    for claim, moment in zip(batch, moments, strict=True):
        if moment.timestamp() >= done_s:
            runnable[claim.task_id] = moment.timestamp()
        else:
            late.append(claim)
    if not late or attempt >= 5:
        # Left leased (a lapsed lease would bring them back).
        return
    now = datetime.fromtimestamp(done_s, UTC)
    lead_s = plan.next_lead(policy, leads[relay], handover_s=retime_s)
    candidates = plan.retime_candidates(late, now=now, lead_s=lead_s)
    admission = limiter.admit_at(
        candidates, now_s=done_s, horizon_s=plan.horizon_for(policy, lead_s)
    )
    retiming = plan.retime(late, admission)
    assert {c.task_id for c in retiming.to_enqueue} | {c.task_id for c in retiming.refused} == {
        c.task_id for c in late
    }
    for at in retiming.queued_at:
        # New moments a lead after the retime: later, never sooner.
        assert at.timestamp() >= done_s + lead_s - 1e-6
    handovers.append(
        (done_s + retime_s, relay, retiming.to_enqueue, retiming.queued_at, attempt + 1)
    )
