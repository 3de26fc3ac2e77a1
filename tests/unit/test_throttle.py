"""The multi-key token buckets and in-flight caps on a fake clock.

Properties: no key ever dispatches more than rate·T + burst in any window of length T,
however requests arrive and whatever the horizon; a standing backlog gets every key its
full rate; in-flight caps are never exceeded; the wait hints are exact.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.memory_limiter import MemoryLimiter
from throttler.limits import LimitKey, RuleSet, Scope
from throttler.throttle import (
    CLUSTER_KEY,
    TAKE_AHEAD_LIMIT_S,
    Bucket,
    BucketState,
    Candidate,
    InflightCaps,
    Request,
    UnlimitedLimiter,
    decide,
    max_admissible,
    restart_floor,
)

rates = st.floats(min_value=0.05, max_value=2000, allow_nan=False, allow_infinity=False)
bursts = st.integers(min_value=1, max_value=50)
horizons = st.sampled_from([0.0, 0.0, 0.05, 0.5, 1.0, 2.5])


@st.composite
def bucket_sets(draw: st.DrawFn) -> list[Bucket]:
    count = draw(st.integers(min_value=1, max_value=5))
    return [
        Bucket(key=LimitKey(scope=Scope.HOST, value=f"h{i}"), rate_per_s=draw(rates), burst=b)
        for i, b in enumerate(draw(st.lists(bursts, min_size=count, max_size=count)))
    ]


@st.composite
def arrival_patterns(draw: st.DrawFn, buckets: int) -> list[tuple[float, list[Request]]]:
    """Steps of (seconds since the previous step, requests asked at that step)."""
    subsets = st.lists(st.integers(0, buckets - 1), max_size=buckets, unique=True).map(tuple)
    request = st.builds(
        Request,
        buckets=subsets,
        not_before_s=st.one_of(st.none(), st.floats(min_value=-1, max_value=3)),
    )
    steps = st.tuples(
        st.floats(min_value=0, max_value=2, allow_nan=False),
        st.lists(request, max_size=30),
    )
    return draw(st.lists(steps, min_size=1, max_size=40))


def assert_rate_bound(times_s: list[float], *, rate_per_s: float, burst: int) -> None:
    """No window [t, t + T] holds more than rate·T + burst dispatches."""
    ordered = sorted(times_s)
    # The worst windows start and end at dispatches.
    for first in range(len(ordered)):
        for last in range(first, min(len(ordered), first + 4 * burst + 200)):
            count = last - first + 1
            allowed = rate_per_s * (ordered[last] - ordered[first]) + burst
            assert count <= math.floor(allowed + 1e-6), (first, last, count, allowed)


def run(
    buckets: list[Bucket],
    pattern: list[tuple[float, list[Request]]],
    *,
    horizon_s: float,
    start_s: float = 1000.0,
    lost_at: frozenset[int] = frozenset(),
    failover_at: Mapping[int, int] | None = None,
    generations: bool = True,
) -> dict[int, list[float]]:
    """Feed the pattern to ``decide``; return each bucket's dispatch times.

    Before each step in ``lost_at`` every bucket is lost (Redis restarted empty) and the
    drain floor is set as the limiter sets it, from the latest dispatch so far.
    Before each step in ``failover_at`` another server takes over with the keys as they
    were that many steps earlier (the takes since were lost: a replica promoted before
    they reached it, or a restart from an older file): a new generation starts, with a
    floor from the latest dispatch, unless ``generations`` is off (the limiter without
    them, which must break the bound).
    """
    states: list[BucketState | None] = [None] * len(buckets)
    now_s = start_s
    drained_at_s = 0.0
    generation = 0
    # (states, floor, generation) before each step, as a lagging copy would hold them.
    history: list[tuple[list[BucketState | None], float, int]] = []
    dispatched: dict[int, list[float]] = defaultdict(list)
    for step, (gap_s, requests) in enumerate(pattern):
        now_s += gap_s
        history.append((states, drained_at_s, generation))
        last = max((t for times in dispatched.values() for t in times), default=None)
        if step in lost_at:
            states = [None] * len(buckets)
            drained_at_s = restart_floor(last_dispatch_s=last, now_s=now_s, horizon_s=horizon_s)
            generation += 1
        elif failover_at and step in failover_at:
            states, drained_at_s, generation = history[max(0, step - failover_at[step])]
            if generations:
                drained_at_s = restart_floor(
                    last_dispatch_s=last, now_s=now_s, horizon_s=horizon_s, previous_s=drained_at_s
                )
                generation += 1
        shifted = [
            Request(
                buckets=r.buckets,
                not_before_s=None if r.not_before_s is None else now_s + r.not_before_s,
            )
            for r in requests
        ]
        decision = decide(
            states,
            buckets,
            shifted,
            now_s=now_s,
            horizon_s=horizon_s,
            drained_at_s=drained_at_s,
            generation=generation,
        )
        states = list(decision.states)
        admitted = dict(decision.admitted)
        for index, request in enumerate(shifted):
            if index not in admitted:
                continue
            delay_s = admitted[index]
            assert 0 <= delay_s <= horizon_s + 1e-9
            if request.not_before_s is not None:
                assert now_s + delay_s >= request.not_before_s
            for b in request.buckets:
                dispatched[b].append(now_s + delay_s)
    return dispatched


@given(data=st.data(), buckets=bucket_sets(), horizon_s=horizons)
@settings(max_examples=300, deadline=None)
def test_no_key_exceeds_rate_times_window_plus_burst(
    data: st.DataObject, buckets: list[Bucket], horizon_s: float
) -> None:
    pattern = data.draw(arrival_patterns(len(buckets)))
    dispatched = run(buckets, pattern, horizon_s=horizon_s)
    for b, times in dispatched.items():
        assert_rate_bound(times, rate_per_s=buckets[b].rate_per_s, burst=buckets[b].burst)


@given(data=st.data(), buckets=bucket_sets(), horizon_s=horizons)
@settings(max_examples=300, deadline=None)
def test_the_bound_holds_across_redis_losing_every_bucket(
    data: st.DataObject, buckets: list[Bucket], horizon_s: float
) -> None:
    pattern = data.draw(arrival_patterns(len(buckets)))
    lost_at = data.draw(st.sets(st.integers(0, len(pattern) - 1), min_size=1, max_size=3))
    dispatched = run(buckets, pattern, horizon_s=horizon_s, lost_at=frozenset(lost_at))
    for b, times in dispatched.items():
        assert_rate_bound(times, rate_per_s=buckets[b].rate_per_s, burst=buckets[b].burst)


@given(data=st.data(), buckets=bucket_sets(), horizon_s=horizons)
@settings(max_examples=300, deadline=None)
def test_the_bound_holds_across_a_failover_that_lost_takes(
    data: st.DataObject, buckets: list[Bucket], horizon_s: float
) -> None:
    pattern = data.draw(arrival_patterns(len(buckets)))
    steps = st.integers(0, len(pattern) - 1)
    failover_at = data.draw(st.dictionaries(steps, st.integers(1, 10), min_size=1, max_size=3))
    lost_at = data.draw(st.sets(steps, max_size=1))
    dispatched = run(
        buckets,
        pattern,
        horizon_s=horizon_s,
        lost_at=frozenset(lost_at),
        failover_at=failover_at,
    )
    for b, times in dispatched.items():
        assert_rate_bound(times, rate_per_s=buckets[b].rate_per_s, burst=buckets[b].burst)


def test_takes_lost_in_a_failover_would_be_granted_again_without_generations() -> None:
    bucket = Bucket(key=CLUSTER_KEY, rate_per_s=10.0, burst=5)
    # Step 0 drains the burst and lends half a second ahead; the failover at step 1 brings
    # back the buckets as they were before step 0 (the replica never saw its takes).
    pattern = [(0.0, [Request(buckets=(0,)) for _ in range(20)])] * 2
    for generations, most in ((False, 20), (True, 10)):
        times = run([bucket], pattern, horizon_s=0.5, failover_at={1: 1}, generations=generations)[
            0
        ]
        assert len(times) == most
    forgetful = run([bucket], pattern, horizon_s=0.5, failover_at={1: 1}, generations=False)
    with pytest.raises(AssertionError):
        assert_rate_bound(forgetful[0], rate_per_s=10.0, burst=5)


def test_a_bucket_of_an_older_generation_holds_at_most_a_missing_one() -> None:
    bucket = Bucket(key=CLUSTER_KEY, rate_per_s=10.0, burst=5)
    full = BucketState(tokens=5.0, updated_s=100.0, rate_per_s=10.0, generation=1)
    owing = BucketState(tokens=-3.0, updated_s=100.0, rate_per_s=10.0, generation=1)
    asks = [Request(buckets=(0,))]
    # The same generation: the saved tokens stand.
    assert decide([full], [bucket], asks, now_s=100.0, generation=1).admitted == ((0, 0.0),)
    # A newer one: no more than refilled since the floor (0.2 s ago: 2 tokens)...
    newer = decide([full], [bucket], asks * 3, now_s=100.0, drained_at_s=99.8, generation=2)
    assert len(newer.admitted) == 2
    assert newer.states[0].generation == 2
    # ... and a debt kept on the old server is still owed.
    assert (
        decide([owing], [bucket], asks, now_s=100.0, drained_at_s=99.8, generation=2).admitted == ()
    )


def test_lost_buckets_would_come_back_full_without_the_drain_floor() -> None:
    bucket = Bucket(key=CLUSTER_KEY, rate_per_s=10.0, burst=5)
    asks = [Request(buckets=(0,)) for _ in range(20)]
    before = decide([None], [bucket], asks, now_s=100.0, horizon_s=0.5)
    # Burst now plus half a second of tokens lent ahead: the window to 100.5 s is full.
    assert [delay for _, delay in before.admitted][-1] == pytest.approx(0.5)
    assert len(before.admitted) == 10
    last = 100.0 + before.admitted[-1][1]
    forgetful = decide([None], [bucket], asks, now_s=100.1, horizon_s=0.5)
    assert len(forgetful.admitted) == 10, "a full bucket again: 20 in 0.5 s, bound is 10"
    floor = restart_floor(last_dispatch_s=last, now_s=100.1, horizon_s=0.5)
    # Not only this claim's horizon: another relay's, stretched with its lead, may reach
    # as far as TAKE_AHEAD_LIMIT_S.
    assert floor == pytest.approx(100.1 + TAKE_AHEAD_LIMIT_S)
    safe = decide([None], [bucket], asks, now_s=100.1, horizon_s=0.5, drained_at_s=floor)
    assert safe.admitted == ()
    assert safe.blocked[0] == pytest.approx(TAKE_AHEAD_LIMIT_S + 0.1, abs=1e-6)


def test_a_new_or_long_idle_cluster_starts_with_full_buckets() -> None:
    bucket = Bucket(key=CLUSTER_KEY, rate_per_s=1 / 3600, burst=4)
    asks = [Request(buckets=(0,)) for _ in range(6)]
    never = restart_floor(last_dispatch_s=None, now_s=5000.0, horizon_s=0.5)
    fresh = decide([None], [bucket], asks, now_s=5000.0, drained_at_s=never)
    assert len(fresh.admitted) == 4
    # Last dispatch two hours ago: two tokens have come back since, no more.
    old = restart_floor(last_dispatch_s=5000.0 - 7200, now_s=5000.0, horizon_s=0.5)
    assert old == 5000.0 - 7200
    assert len(decide([None], [bucket], asks, now_s=5000.0, drained_at_s=old).admitted) == 2


@given(data=st.data(), buckets=bucket_sets(), horizon_s=horizons)
@settings(max_examples=200, deadline=None)
def test_a_refused_request_takes_nothing_and_blocks_nobody_else(
    data: st.DataObject, buckets: list[Bucket], horizon_s: float
) -> None:
    pattern = data.draw(arrival_patterns(len(buckets)))
    states: list[BucketState | None] = [None] * len(buckets)
    now_s = 0.0
    for gap_s, requests in pattern:
        now_s += gap_s
        decision = decide(states, buckets, requests, now_s=now_s, horizon_s=horizon_s)
        admitted = {index for index, _ in decision.admitted}
        # Asking with the refused requests left out gives exactly the same answer.
        kept = [r for i, r in enumerate(requests) if i in admitted]
        alone = decide(states, buckets, kept, now_s=now_s, horizon_s=horizon_s)
        assert alone.states == decision.states
        assert [d for _, d in alone.admitted] == [d for _, d in decision.admitted]
        for index, request in enumerate(requests):
            if index in admitted:
                continue
            # Refused: past its not-before horizon, or a bucket reported as blocked.
            late = request.not_before_s is not None and request.not_before_s - now_s > horizon_s
            assert late or any(b in decision.blocked for b in request.buckets)
        states = list(decision.states)


@given(
    buckets=bucket_sets(),
    late_s=st.lists(st.floats(min_value=0, max_value=0.2), min_size=1, max_size=10),
)
@settings(max_examples=60, deadline=None)
def test_standing_backlog_gets_every_key_its_full_rate(
    buckets: list[Bucket], late_s: list[float]
) -> None:
    # A relay-like client: each step offers, for every key not known to be blocked, as
    # many tasks as it could take; a blocked key is asked again half a horizon before
    # its next token; steps come up to 0.2 s late. Rates are kept moderate so that a
    # run of 20 s stays quick.
    buckets = [
        Bucket(key=b.key, rate_per_s=min(b.rate_per_s, 80.0) + 0.5, burst=b.burst) for b in buckets
    ]
    horizon_s = 0.5
    end_s = 20.0
    states: list[BucketState | None] = [None] * len(buckets)
    blocked_until: dict[int, float] = {}
    counts = [0] * len(buckets)
    now_s = 0.0
    step = 0
    while now_s < end_s:
        offered = [
            Request(buckets=(b,))
            for b, bucket in enumerate(buckets)
            if blocked_until.get(b, -1.0) <= now_s
            for _ in range(math.ceil(bucket.rate_per_s * horizon_s) + bucket.burst)
        ]
        decision = decide(states, buckets, offered, now_s=now_s, horizon_s=horizon_s)
        states = list(decision.states)
        for index, delay_s in decision.admitted:
            if now_s + delay_s <= end_s:
                counts[offered[index].buckets[0]] += 1
        for b, wait_s in decision.blocked.items():
            blocked_until[b] = now_s + wait_s - horizon_s / 2
        next_s = min([now_s + 0.05, *blocked_until.values()])
        now_s = max(now_s, next_s) + late_s[step % len(late_s)]
        step += 1
    for b, bucket in enumerate(buckets):
        # The burst at once, then one token every 1/rate, none lost to late steps.
        assert counts[b] >= 0.98 * bucket.rate_per_s * end_s, (bucket, counts[b])
        assert counts[b] <= bucket.rate_per_s * end_s + bucket.burst + 1e-6


@given(
    rate_per_s=rates,
    burst=bursts,
    pattern=st.lists(
        st.tuples(st.floats(min_value=0, max_value=3, allow_nan=False), st.integers(0, 60)),
        min_size=1,
        max_size=40,
    ),
)
@settings(max_examples=200, deadline=None)
def test_wait_hint_is_exactly_when_the_next_token_is_due(
    rate_per_s: float, burst: int, pattern: list[tuple[float, int]]
) -> None:
    bucket = Bucket(key=CLUSTER_KEY, rate_per_s=rate_per_s, burst=burst)
    state: BucketState | None = None
    now_s = 1000.0
    for gap_s, want in pattern:
        now_s += gap_s
        decision = decide([state], [bucket], [Request(buckets=(0,))] * want, now_s=now_s)
        state = decision.states[0]
        if len(decision.admitted) == want:
            continue
        wait_s = decision.blocked[0]
        assert wait_s > 0
        later = decide([state], [bucket], [Request(buckets=(0,))], now_s=now_s + wait_s)
        assert len(later.admitted) == 1, "no token after waiting the hinted time"
        if (1 - state.tokens) > 1e-4:
            early_s = now_s + wait_s * (1 - 1e-3)
            early = decide([state], [bucket], [Request(buckets=(0,))], now_s=early_s)
            assert early.admitted == (), "the hint is padded"


def test_fresh_bucket_grants_burst_then_one_token_per_interval() -> None:
    bucket = Bucket(key=CLUSTER_KEY, rate_per_s=4, burst=3)
    ten = [Request(buckets=(0,))] * 10
    first = decide([None], [bucket], ten, now_s=0.0)
    assert (len(first.admitted), first.blocked) == (3, {0: 0.25})
    second = decide(first.states, [bucket], ten, now_s=0.25)
    assert (len(second.admitted), second.blocked) == (1, {0: 0.25})
    # Idle for a long time: refills to burst, never beyond.
    idle = decide(second.states, [bucket], ten, now_s=100.0)
    assert len(idle.admitted) == 3
    # Asked ahead: the next two tokens come at 0.25 s and 0.5 s.
    ahead = decide(idle.states, [bucket], ten, now_s=100.0, horizon_s=0.5)
    assert [i for i, _ in ahead.admitted] == [0, 1]
    assert [d for _, d in ahead.admitted] == pytest.approx([0.25, 0.5])


def test_a_request_waits_for_its_slowest_bucket_and_is_charged_then() -> None:
    fast = Bucket(key=LimitKey(scope=Scope.TASK, value="greeting"), rate_per_s=10, burst=5)
    slow = Bucket(key=LimitKey(scope=Scope.HOST, value="h"), rate_per_s=2, burst=1)
    states: list[BucketState | None] = [None, BucketState(tokens=0.0, updated_s=0.0)]
    both = Request(buckets=(0, 1))
    decision = decide(states, [fast, slow], [both], now_s=0.0, horizon_s=1.0)
    # The slow bucket's token is due at 0.5 s; the fast bucket, full, is charged at 0.5 s.
    assert [i for i, _ in decision.admitted] == [0]
    assert decision.admitted[0][1] == pytest.approx(0.5)
    # Charged at 0.5 s, when it would hold 5 (full) and keeps 4: -1 at 0 s.
    assert decision.states[0].tokens == pytest.approx(-1.0)
    # Not before: the request goes no earlier than asked, charged at that moment.
    timed = Request(buckets=(0,), not_before_s=0.8)
    later = decide(decision.states, [fast, slow], [timed], now_s=0.0, horizon_s=1.0)
    assert [d for _, d in later.admitted] == pytest.approx([0.8])
    too_late = Request(buckets=(0,), not_before_s=1.5)
    assert decide(later.states, [fast, slow], [too_late], now_s=0.0, horizon_s=1.0).admitted == ()


def _candidate(
    i: int, *, name: str = "greeting", account: str = "a", host: str | None = None
) -> Candidate:
    return Candidate(task_id=f"t{i}", name=name, account=account, host=host)


async def test_memory_limiter_skips_a_blocked_host_without_blocking_others() -> None:
    now = [100.0]
    limiter = MemoryLimiter(
        rules=RuleSet.parse("host:* rate=1/s", cluster_rate_per_s=10, cluster_burst=5),
        clock=lambda: now[0],
    )
    slow = [_candidate(i, name="download", host="slow.example") for i in range(4)]
    others = [_candidate(10 + i) for i in range(3)]
    admission = await limiter.admit([*slow, *others])
    assert admission.admitted == (slow[0], *others)
    host_key = LimitKey(scope=Scope.HOST, value="slow.example")
    assert admission.blocked == {host_key: pytest.approx(1.0)}
    assert admission.wait_s == 0  # the cluster bucket was not the limit
    assert admission.granted_at_s == 100.0
    # The cluster bucket has one token left: one more greeting, then the cluster waits.
    more = await limiter.admit([_candidate(20), _candidate(21)])
    assert more.admitted == (_candidate(20),)
    assert more.wait_s == pytest.approx(0.1)
    assert set(more.blocked) == {CLUSTER_KEY}


async def test_unlimited_admits_everything_but_respects_not_before() -> None:
    now = [50.0]
    limiter = UnlimitedLimiter(clock=lambda: now[0])
    candidates = [_candidate(i) for i in range(1000)]
    admission = await limiter.admit(candidates)
    assert admission.admitted == tuple(candidates)
    assert set(admission.ready_in_s) == {0.0}
    timed = Candidate(task_id="x", name="greeting", account="a", not_before_s=50.3)
    ahead = await limiter.admit([timed], horizon_s=0.5)
    assert list(ahead.ready_in_s) == pytest.approx([0.3])
    assert (await limiter.admit([timed])).admitted == ()


def test_claim_size_follows_the_cluster_rate() -> None:
    assert (
        max_admissible(RuleSet.parse("", cluster_rate_per_s=40, cluster_burst=3), horizon_s=0.5)
        == 23
    )
    assert max_admissible(RuleSet.parse("host:* rate=1/s"), horizon_s=0.5) is None


@st.composite
def cap_rules(draw: st.DrawFn) -> RuleSet:
    parts = []
    if draw(st.booleans()):
        parts.append(f"cluster inflight={draw(st.integers(1, 6))}")
    if draw(st.booleans()):
        parts.append(f"account:* inflight={draw(st.integers(1, 4))}")
    if draw(st.booleans()):
        parts.append(f"host:* inflight={draw(st.integers(1, 3))}")
    if draw(st.booleans()):
        parts.append(f"task:download inflight={draw(st.integers(1, 3))}")
    parts.append(f"account:a0 inflight={draw(st.integers(1, 2))}")
    return RuleSet.parse("; ".join(parts))


tasks = st.builds(
    lambda name, account, host: (name, account, host if name == "download" else None),
    st.sampled_from(["greeting", "download"]),
    st.sampled_from(["a0", "a1", "a2"]),
    st.sampled_from(["h0", "h1"]),
)


@given(
    rules=cap_rules(),
    steps=st.lists(
        st.tuples(st.lists(tasks, max_size=8), st.integers(0, 5), st.integers(0, 6)),
        min_size=1,
        max_size=40,
    ),
)
@settings(max_examples=300, deadline=None)
def test_inflight_caps_are_never_exceeded(
    rules: RuleSet, steps: list[tuple[list[tuple[str, str, str | None]], int, int]]
) -> None:
    # Each step: new tasks arrive, some running ones finish, then a claim fits what it can.
    caps = InflightCaps(rules)
    waiting: list[Candidate] = []
    running: list[Candidate] = []
    serial = 0
    for arrivals, finishing, room in steps:
        for name, account, host in arrivals:
            waiting.append(Candidate(task_id=f"t{serial}", name=name, account=account, host=host))
            serial += 1
        running = running[finishing:]
        inflight: dict[LimitKey, int] = defaultdict(int)
        for task in running:
            for key in caps.keys(task):
                inflight[key] += 1
        # What the claim query leaves out, then what fits in the rest.
        full = caps.full(inflight)
        offered = [c for c in waiting if not set(caps.keys(c)) & full]
        kept, _ = caps.fit(offered, inflight, room=room)
        assert len(kept) <= room
        running += kept
        waiting = [c for c in waiting if c not in kept]
        totals: dict[LimitKey, int] = defaultdict(int)
        for task in running:
            for key in caps.keys(task):
                totals[key] += 1
        for key, count in totals.items():
            cap = caps.cap(key)
            assert cap is not None
            assert count <= cap, (key, count, cap)
    # Whatever fits is taken: with nothing running, the first waiting task always fits.
    if waiting:
        kept, _ = caps.fit(waiting, {}, room=None)
        assert kept[:1] == waiting[:1]


@given(
    old_rate=rates,
    old_burst=bursts,
    new_rate=rates,
    new_burst=bursts,
    horizon_s=horizons,
    gaps=st.lists(st.floats(min_value=0.0, max_value=0.3), min_size=2, max_size=40),
    change_at=st.integers(min_value=1, max_value=39),
    idle_s=st.floats(min_value=0.0, max_value=3.0),
)
@settings(max_examples=300, deadline=None)
def test_a_rate_change_lets_no_old_token_through_faster_than_the_new_rule(
    old_rate: float,
    old_burst: int,
    new_rate: float,
    new_burst: int,
    horizon_s: float,
    gaps: list[float],
    change_at: int,
    idle_s: float,
) -> None:
    """A standing backlog under one rule, then under another (PUT /limits).

    What the new rule grants alone keeps rate·T + burst (old tokens beyond the new burst
    are gone), and starts only after the old rule's last grant: a debt keeps its length
    in time, so the old and the new releases never overlap (lowering: the taken-ahead
    tasks are not followed by a burst; raising: the new rate starts when they end).
    """
    key = LimitKey(scope=Scope.CLUSTER)
    rules = [
        Bucket(key=key, rate_per_s=old_rate, burst=old_burst),
        Bucket(key=key, rate_per_s=new_rate, burst=new_burst),
    ]
    state: BucketState | None = None
    now_s = 1000.0
    granted: list[list[float]] = [[], []]
    for step, gap_s in enumerate(gaps):
        now_s += gap_s + (idle_s if step == change_at else 0.0)
        rule = 0 if step < change_at else 1
        decision = decide(
            [state],
            [rules[rule]],
            [Request(buckets=(0,)) for _ in range(20)],
            now_s=now_s,
            horizon_s=horizon_s,
        )
        [state] = decision.states
        granted[rule] += [now_s + delay_s for _, delay_s in decision.admitted]
    old, new = granted
    assert_rate_bound(new, rate_per_s=new_rate, burst=new_burst)
    if old and new:
        assert min(new) >= max(old) - 1e-6, (max(old), min(new))


def test_a_lowered_rate_keeps_at_most_its_new_burst_of_a_full_bucket() -> None:
    key = LimitKey(scope=Scope.CLUSTER)
    full = BucketState(tokens=500.0, updated_s=0.0, rate_per_s=500.0)
    decision = decide(
        [full],
        [Bucket(key=key, rate_per_s=50.0, burst=1)],
        [Request(buckets=(0,)) for _ in range(100)],
        now_s=1.0,
        horizon_s=0.5,
    )
    # One token now, then one per 20 ms within the horizon: 1 + 25.
    assert len(decision.admitted) == 26
