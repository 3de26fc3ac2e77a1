"""The relay's per-row shortcuts give what the straightforward computation gives.

A claim plans up to a thousand rows, so the planning remembers what rows of one shape
(name, account, host, labels) share: ``RuleSet.applicable``'s limits per value, ``plan``'s
buckets and requests, the caps' keys, ``moments``' conversions; and the unlimited limiter
skips ``decide``. Each is held here to the computation it replaces, written out plainly.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.plan import moments
from throttler import limits
from throttler.limits import AppliedLimit, Limit, LimitKey, Rule, RuleSet, Scope, each_value
from throttler.throttle import (
    Admission,
    Bucket,
    Candidate,
    InflightCaps,
    Request,
    _admission,
    _Plan,
    decide,
    new_candidate,
    plan,
    unlimited,
)

_NO_CAP = 2**62

names = st.sampled_from(["greeting", "download", ""])
accounts = st.sampled_from(["a0", "a1", "a2", ""])
hosts = st.sampled_from([None, "", "h0", "H0", "h1"])
labels = st.lists(st.sampled_from(["c:x", "c:y", "t:x", "t:z"]), max_size=3, unique=True).map(
    lambda found: tuple(sorted(found))
)
limit_values = st.builds(
    Limit,
    rate_per_s=st.one_of(st.none(), st.sampled_from([0.5, 1.0, 10.0])),
    burst=st.integers(1, 3),
    inflight=st.one_of(st.none(), st.integers(1, 4)),
)
rule_keys = st.sampled_from(
    [
        (Scope.CLUSTER, None),
        (Scope.TASK, "*"),
        (Scope.TASK, "download"),
        (Scope.ACCOUNT, "*"),
        (Scope.ACCOUNT, "a1"),
        (Scope.HOST, "*"),
        (Scope.HOST, "h0"),
        (Scope.KEY, "c:*"),
        (Scope.KEY, "c:x"),
        (Scope.KEY, "t:z"),
    ]
)


@st.composite
def rule_sets(draw: st.DrawFn) -> RuleSet:
    chosen = draw(st.lists(rule_keys, max_size=6, unique=True))
    return RuleSet(
        tuple(
            Rule(scope=scope, value=value, limit=draw(limit_values), text=f"{scope}:{value}")
            for scope, value in chosen
        )
    )


@st.composite
def candidate_lists(draw: st.DrawFn) -> list[Candidate]:
    shapes = draw(st.lists(st.tuples(names, accounts, hosts, labels), min_size=1, max_size=5))
    moments_s = st.one_of(st.none(), st.sampled_from([99.0, 100.0, 100.25, 103.0]))
    picks = draw(st.lists(st.tuples(st.sampled_from(shapes), moments_s), max_size=25))
    return [
        Candidate(task_id=f"t{i}", name=n, account=a, host=h, not_before_s=not_before_s, labels=ls)
        for i, ((n, a, h, ls), not_before_s) in enumerate(picks)
    ]


def applicable_plainly(
    rules: RuleSet, *, name: str, account: str, host: str | None, labels: Iterable[str]
) -> list[AppliedLimit]:
    """Every scope's key looked up anew (RuleSet.applicable before it remembered)."""
    wanted = [
        (Scope.CLUSTER, None),
        (Scope.TASK, name),
        (Scope.ACCOUNT, account),
        (Scope.HOST, host.lower() if host else None),
    ]
    wanted += [(Scope.KEY, label) for label in labels]
    applied = []
    for scope, value in wanted:
        if scope is not Scope.CLUSTER and value is None:
            continue
        key = LimitKey(scope=scope, value=value)
        rule = rules.rule_for(key)
        if rule is not None:
            applied.append(AppliedLimit(key=key, limit=rule.limit, rule=rule))
    return applied


def plan_plainly(rules: RuleSet, candidates: list[Candidate]) -> _Plan:
    """One request per candidate, its limits looked up anew (plan before shapes)."""
    index: dict[LimitKey, int] = {}
    buckets: list[Bucket] = []
    requests = []
    for c in candidates:
        mine = []
        for applied in applicable_plainly(
            rules, name=c.name, account=c.account, host=c.host, labels=c.labels
        ):
            rate = applied.limit.rate_per_s
            if rate is None:
                continue
            if applied.key not in index:
                index[applied.key] = len(buckets)
                buckets.append(Bucket(key=applied.key, rate_per_s=rate, burst=applied.limit.burst))
            mine.append(index[applied.key])
        requests.append(Request(buckets=tuple(mine), not_before_s=c.not_before_s))
    return _Plan(buckets=tuple(buckets), requests=tuple(requests))


def fit_plainly(
    rules: RuleSet,
    candidates: list[Candidate],
    inflight: Mapping[LimitKey, int],
    *,
    room: int | None,
    holding: frozenset[str],
) -> tuple[list[Candidate], bool]:
    """Each candidate's capped keys and counts looked up anew (fit before slots)."""
    caps = InflightCaps(rules)
    kept: list[Candidate] = []
    taken: dict[LimitKey, int] = {}
    left_out = False
    for c in candidates:
        if c.task_id in holding:
            kept.append(c)
            continue
        keys = [
            a.key
            for a in applicable_plainly(
                rules, name=c.name, account=c.account, host=c.host, labels=c.labels
            )
            if a.limit.inflight is not None
        ]
        if (room is not None and room <= 0) or any(
            inflight.get(key, 0) + taken.get(key, 0) >= (caps.cap(key) or _NO_CAP) for key in keys
        ):
            left_out = True
            continue
        for key in keys:
            taken[key] = taken.get(key, 0) + 1
        if room is not None:
            room -= 1
        kept.append(c)
    return kept, left_out


@given(rules=rule_sets(), candidates=candidate_lists())
@settings(max_examples=300, deadline=None)
def test_applicable_remembers_what_it_would_find_anew(
    rules: RuleSet, candidates: list[Candidate]
) -> None:
    # A memory of two values per scope: it also starts over while a claim is planned.
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(limits, "_MEMO_SIZE", 2)
        for _ in range(2):
            for c in candidates:
                found = rules.applicable(
                    name=c.name, account=c.account, host=c.host, labels=c.labels
                )
                assert found == applicable_plainly(
                    rules, name=c.name, account=c.account, host=c.host, labels=c.labels
                )


def test_an_empty_rule_set_applies_nothing_and_remembers_nothing() -> None:
    rules = RuleSet(())
    assert rules.applicable(name="greeting", account="a0", host="h0", labels=("c:x",)) == []
    assert rules.rule_for(LimitKey(scope=Scope.TASK, value="greeting")) is None
    assert each_value(LimitKey(scope=Scope.KEY, value="c:x")) == "c:*"


@given(rules=rule_sets(), candidates=candidate_lists())
@settings(max_examples=300, deadline=None)
def test_plan_by_shape_is_the_plan_candidate_by_candidate(
    rules: RuleSet, candidates: list[Candidate]
) -> None:
    assert plan(rules, candidates) == plan_plainly(rules, candidates)


@given(
    candidates=candidate_lists(),
    now_s=st.sampled_from([99.5, 100.0, 101.0]),
    horizon_s=st.sampled_from([0.0, 0.5, 2.5]),
)
@settings(max_examples=300, deadline=None)
def test_the_unlimited_admission_is_decide_with_no_bucket(
    candidates: list[Candidate], now_s: float, horizon_s: float
) -> None:
    planned = plan(RuleSet(()), candidates)
    decision = decide((), (), planned.requests, now_s=now_s, horizon_s=horizon_s)
    assert unlimited(candidates, now_s=now_s, horizon_s=horizon_s) == _admission(
        candidates, planned, decision, granted_at_s=now_s
    )


@given(
    rules=rule_sets(),
    candidates=candidate_lists(),
    counts=st.dictionaries(st.sampled_from(["h0", "a1", "c:x", "download"]), st.integers(0, 5)),
    room=st.one_of(st.none(), st.integers(0, 30)),
    held=st.sets(st.integers(0, 25), max_size=5),
)
@settings(max_examples=300, deadline=None)
def test_caps_fit_by_slot_is_fit_key_by_key(
    rules: RuleSet,
    candidates: list[Candidate],
    counts: dict[str, int],
    room: int | None,
    held: set[int],
) -> None:
    scopes = {"h0": Scope.HOST, "a1": Scope.ACCOUNT, "c:x": Scope.KEY, "download": Scope.TASK}
    inflight = {LimitKey(scope=scopes[value], value=value): n for value, n in counts.items()}
    inflight[LimitKey(scope=Scope.CLUSTER)] = sum(counts.values())
    holding = frozenset(f"t{i}" for i in held)
    assert InflightCaps(rules).fit(candidates, inflight, room=room, holding=holding) == fit_plainly(
        rules, candidates, inflight, room=room, holding=holding
    )


def test_new_candidate_sets_every_field_as_the_constructor_does() -> None:
    fields = [field.name for field in dataclasses.fields(Candidate)]
    assert list(inspect.signature(new_candidate).parameters) == fields
    made = new_candidate(
        task_id="t1", name="download", account="a1", host="h0", not_before_s=100.5, labels=("c:x",)
    )
    plain = Candidate(
        task_id="t1", name="download", account="a1", host="h0", not_before_s=100.5, labels=("c:x",)
    )
    assert made == plain
    assert hash(made) == hash(plain)
    assert repr(made) == repr(plain)
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.name = "greeting"  # type: ignore[misc]


@given(
    granted_at_s=st.floats(min_value=1e9, max_value=2e9),
    delays=st.lists(st.sampled_from([0.0, -0.0, 0.1, 0.1000001, 0.35, 1e-7, 2.5]), max_size=20),
)
@settings(max_examples=200, deadline=None)
def test_moments_convert_each_delay_as_one_by_one(granted_at_s: float, delays: list[float]) -> None:
    admission = Admission(
        admitted=tuple(
            Candidate(task_id=f"t{i}", name="greeting", account="a0") for i in range(len(delays))
        ),
        ready_in_s=tuple(delays),
        granted_at_s=granted_at_s,
    )
    granted = datetime.fromtimestamp(granted_at_s, UTC)
    assert moments(admission) == tuple(granted + timedelta(seconds=d) for d in delays)
