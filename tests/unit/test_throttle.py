"""The token bucket on a fake clock: the rate bound, the long-run rate, the wait hint."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from throttler.throttle import (
    BucketState,
    Candidate,
    MemoryTokenBucket,
    UnlimitedLimiter,
    ready_in_s,
    take,
)

rates = st.floats(min_value=0.05, max_value=5000, allow_nan=False, allow_infinity=False)
bursts = st.integers(min_value=1, max_value=200)
# (seconds since the previous request, tokens wanted)
requests = st.lists(
    st.tuples(st.floats(min_value=0, max_value=3, allow_nan=False), st.integers(0, 300)),
    min_size=1,
    max_size=80,
)


@dataclass(frozen=True)
class Grant:
    at_s: float
    count: int


def _run(
    pattern: list[tuple[float, int]], *, rate_per_s: float, burst: int, start_s: float
) -> list[Grant]:
    state: BucketState | None = None
    now_s = start_s
    grants = []
    for gap_s, want in pattern:
        now_s += gap_s
        state, granted, _ = take(state, now_s=now_s, want=want, rate_per_s=rate_per_s, burst=burst)
        grants.append(Grant(at_s=now_s, count=granted))
    return grants


def _assert_rate_bound(grants: list[Grant], *, rate_per_s: float, burst: int) -> None:
    # Every window [t, t + T] that holds grants is spanned by its first and last grant,
    # so windows anchored at grant times cover the worst case.
    for first, start in enumerate(grants):
        total = 0
        for end in grants[first:]:
            total += end.count
            allowed = rate_per_s * (end.at_s - start.at_s) + burst
            assert total <= math.floor(allowed + 1e-6), (start, end, total, allowed)


@given(
    pattern=requests,
    rate_per_s=rates,
    burst=bursts,
    start_s=st.floats(min_value=0, max_value=1e6, allow_nan=False),
)
@settings(max_examples=300, deadline=None)
def test_no_window_exceeds_rate_times_length_plus_burst(
    pattern: list[tuple[float, int]], rate_per_s: float, burst: int, start_s: float
) -> None:
    grants = _run(pattern, rate_per_s=rate_per_s, burst=burst, start_s=start_s)
    _assert_rate_bound(grants, rate_per_s=rate_per_s, burst=burst)


@given(
    rate_per_s=rates,
    burst=bursts,
    want=st.integers(min_value=1, max_value=500),
    late_s=st.lists(st.floats(min_value=0, max_value=0.5), min_size=1, max_size=20),
)
@settings(max_examples=300, deadline=None)
def test_standing_backlog_gets_the_full_rate_and_never_more(
    rate_per_s: float, burst: int, want: int, late_s: list[float]
) -> None:
    # A client that always wants more and asks again exactly when told to.
    state: BucketState | None = None
    now_s = 100.0
    grants = []
    target_tokens = 200 + burst
    total = 0
    steps = 0
    while total < target_tokens:
        state, granted, wait_s = take(
            state, now_s=now_s, want=want, rate_per_s=rate_per_s, burst=burst
        )
        grants.append(Grant(at_s=now_s, count=granted))
        total += granted
        steps += 1
        assert steps < 10 * target_tokens, "the client stopped making progress"
        now_s += wait_s
    elapsed_s = now_s - 100.0
    # Burst at t=0, then one token per 1/rate: the achieved rate is at least the rate.
    assert total - burst >= 0.98 * rate_per_s * elapsed_s
    _assert_rate_bound(grants[-60:], rate_per_s=rate_per_s, burst=burst)


@given(
    pattern=requests,
    rate_per_s=rates,
    burst=bursts,
)
@settings(max_examples=300, deadline=None)
def test_wait_hint_is_exactly_when_the_next_token_is_due(
    pattern: list[tuple[float, int]], rate_per_s: float, burst: int
) -> None:
    state: BucketState | None = None
    now_s = 1000.0
    for gap_s, want in pattern:
        now_s += gap_s
        state, _, wait_s = take(state, now_s=now_s, want=want, rate_per_s=rate_per_s, burst=burst)
        assert wait_s >= 0
        if wait_s == 0:
            assert state.tokens >= 1 - 1e-9
            continue
        _, granted, _ = take(
            state, now_s=now_s + wait_s, want=1, rate_per_s=rate_per_s, burst=burst
        )
        assert granted == 1, "no token after waiting the hinted time"
        if (1 - state.tokens) > 1e-4:
            # Asking noticeably earlier still finds no whole token: the hint is not padded.
            _, early, _ = take(
                state,
                now_s=now_s + wait_s * (1 - 1e-3),
                want=1,
                rate_per_s=rate_per_s,
                burst=burst,
            )
            assert early == 0


@given(
    pattern=requests,
    rate_per_s=rates,
    burst=bursts,
    horizon_s=st.floats(min_value=0, max_value=2, allow_nan=False),
)
@settings(max_examples=300, deadline=None)
def test_tokens_taken_ahead_keep_the_bound_at_their_ready_times(
    pattern: list[tuple[float, int]], rate_per_s: float, burst: int, horizon_s: float
) -> None:
    # A relay asking ahead dispatches each token at its ready time, never before.
    state: BucketState | None = None
    now_s = 50.0
    dispatches: list[float] = []
    for gap_s, want in pattern:
        now_s += gap_s
        state, granted, _ = take(
            state,
            now_s=now_s,
            want=want,
            rate_per_s=rate_per_s,
            burst=burst,
            horizon_s=horizon_s,
        )
        delays = ready_in_s(tokens_left=state.tokens, granted=granted, rate_per_s=rate_per_s)
        assert all(0 <= delay <= horizon_s + 1e-9 for delay in delays)
        dispatches += [now_s + delay for delay in delays]
    dispatches.sort()
    grants = [Grant(at_s=at_s, count=1) for at_s in dispatches[:150]]
    _assert_rate_bound(grants, rate_per_s=rate_per_s, burst=burst)


@given(rate_per_s=rates, burst=bursts, late_s=st.floats(min_value=0, max_value=1))
@settings(max_examples=200, deadline=None)
def test_a_caller_asking_ahead_loses_nothing_however_late_within_the_horizon(
    rate_per_s: float, burst: int, late_s: float
) -> None:
    # Ask every time half a horizon before the next token, plus up to ``late_s`` of
    # scheduling delay; the horizon covers the delay, so each token goes on time.
    horizon_s = 2 * late_s + 2 / rate_per_s
    state, granted, wait_s = take(
        None, now_s=0.0, want=10**6, rate_per_s=rate_per_s, burst=burst, horizon_s=horizon_s
    )
    total = granted
    now_s = 0.0
    delays = ready_in_s(tokens_left=state.tokens, granted=granted, rate_per_s=rate_per_s)
    last_ready_s = delays[-1]
    while total < 100 + burst:
        now_s += max(0.0, wait_s - horizon_s / 2) + late_s
        state, granted, wait_s = take(
            state, now_s=now_s, want=10**6, rate_per_s=rate_per_s, burst=burst, horizon_s=horizon_s
        )
        delays = ready_in_s(tokens_left=state.tokens, granted=granted, rate_per_s=rate_per_s)
        if delays:
            last_ready_s = now_s + delays[-1]
        total += granted
    # Token n (after the burst) is ready at n / rate: none was lost to lateness.
    assert last_ready_s == pytest.approx((total - burst) / rate_per_s, rel=1e-6, abs=1e-6)


def test_fresh_bucket_grants_burst_then_one_token_per_interval() -> None:
    state, granted, wait_s = take(None, now_s=0.0, want=10, rate_per_s=4, burst=3)
    assert (granted, wait_s) == (3, 0.25)
    state, granted, wait_s = take(state, now_s=0.25, want=10, rate_per_s=4, burst=3)
    assert (granted, wait_s) == (1, 0.25)
    # Idle for a long time: refills to burst, never beyond.
    state, granted, _ = take(state, now_s=100.0, want=10, rate_per_s=4, burst=3)
    assert granted == 3
    assert state.tokens == 0


def test_partial_tokens_accumulate_and_a_clock_stepping_back_adds_nothing() -> None:
    state, _, _ = take(None, now_s=10.0, want=1, rate_per_s=2, burst=1)
    state, granted, wait_s = take(state, now_s=10.3, want=1, rate_per_s=2, burst=1)
    assert granted == 0
    assert wait_s == pytest.approx(0.2)
    state, granted, _ = take(state, now_s=9.0, want=1, rate_per_s=2, burst=1)
    assert granted == 0
    assert state.updated_s == 10.3
    _, granted, _ = take(state, now_s=10.5, want=1, rate_per_s=2, burst=1)
    assert granted == 1


def _candidates(count: int) -> list[Candidate]:
    return [Candidate(task_id=f"t{i}", name="greeting", account="a") for i in range(count)]


async def test_memory_bucket_admits_a_prefix_and_says_when_to_return() -> None:
    now = [0.0]
    bucket = MemoryTokenBucket(rate_per_s=10, burst=2, clock=lambda: now[0])
    candidates = _candidates(5)
    first = await bucket.admit(candidates)
    assert first.admitted == tuple(candidates[:2])
    assert first.wait_s == pytest.approx(0.1)
    assert first.ready_in_s == (0.0, 0.0)
    now[0] = 0.05
    assert (await bucket.admit(candidates)).admitted == ()
    now[0] = 0.1
    assert (await bucket.admit(candidates)).admitted == tuple(candidates[:1])
    now[0] = 10.0
    everything = await bucket.admit(candidates[:2])
    assert everything.admitted == tuple(candidates[:2])
    assert everything.wait_s == 0
    # Asked ahead: the bucket is empty, the next two tokens come at 0.1 s and 0.2 s.
    ahead = await bucket.admit(candidates, horizon_s=0.25)
    assert ahead.admitted == tuple(candidates[:2])
    assert ahead.ready_in_s == pytest.approx((0.1, 0.2))
    assert ahead.wait_s == pytest.approx(0.3)


async def test_unlimited_admits_everything() -> None:
    candidates = _candidates(1000)
    admission = await UnlimitedLimiter().admit(candidates)
    assert admission.admitted == tuple(candidates)
    assert admission.wait_s == 0
    zero_rate = await MemoryTokenBucket(rate_per_s=0, burst=1).admit(candidates)
    assert zero_rate.admitted == tuple(candidates)
