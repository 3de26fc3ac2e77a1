"""The rules in force: the environment's, overridden scope by scope by the API's rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from throttler.limits import Limit, LimitKey, LimitRuleError, RuleSet, Scope
from throttler.limits_in_force import Override, Source, in_force, parse_scope, rate_text
from throttler.statuses import TaskStatus
from throttler.store.outbox import Exclusions
from throttler.waiting import Reason, WaitingBoard, why_waiting

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
ENV = RuleSet.parse(
    "task:greeting rate=2/s burst=3; host:* rate=1/s", cluster_rate_per_s=100, cluster_burst=10
)
CLUSTER = LimitKey(scope=Scope.CLUSTER)
GREETING = LimitKey(scope=Scope.TASK, value="greeting")


def test_without_rows_the_env_rules_are_in_force() -> None:
    merged = in_force(ENV, [])
    assert merged.rules.rules == ENV.rules
    assert set(merged.sources.values()) == {Source.ENV}


def test_an_api_rule_replaces_the_env_rule_of_its_scope_whole() -> None:
    merged = in_force(ENV, [Override(key=CLUSTER, limit=Limit(inflight=5))])
    rule = merged.rules.rule_for(CLUSTER)
    assert rule is not None
    # The shorthand's rate is gone with the rest: the PUT body is the whole rule.
    assert rule.limit == Limit(inflight=5)
    assert rule.text == "cluster inflight=5"
    assert merged.sources[CLUSTER] is Source.API
    # A specific rule beats the env's * rule for its value.
    host = LimitKey(scope=Scope.HOST, value="example.com")
    own = in_force(ENV, [Override(key=host, limit=Limit(rate_per_s=5.0, burst=2))])
    found = own.rules.rule_for(host)
    assert found is not None
    assert found.limit.rate_per_s == 5.0


def test_a_pause_only_row_keeps_the_env_rule_and_pauses_until_its_end() -> None:
    until = NOW + timedelta(minutes=5)
    merged = in_force(ENV, [Override(key=GREETING, limit=None, paused_until=until)])
    assert merged.rules.rule_for(GREETING) == ENV.rule_for(GREETING)
    assert merged.paused_at(NOW) == {GREETING: until}
    assert merged.paused_at(until) == {}
    [listed] = [r for r in merged.listing(now=NOW) if r.key == GREETING]
    assert listed.source is Source.ENV
    assert listed.paused_until == until


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("cluster", "cluster"),
        ("task:*", "task:*"),
        ("host:127.1", "host:127.0.0.1"),
        ("host:[0::1]", "host:[::1]"),
        ("host:EXAMPLE.com.", "host:example.com"),
        ("account:acme", "account:acme"),
    ],
)
def test_scopes_are_read_as_rules_name_them(written: str, key: str) -> None:
    assert str(parse_scope(written)) == key


@pytest.mark.parametrize(
    "written", ["", " cluster", "planet:x", "task:nope", "host:::1", "cluster:x", "task: x"]
)
def test_a_bad_scope_is_quoted(written: str) -> None:
    with pytest.raises(LimitRuleError) as caught:
        parse_scope(written)
    assert repr(written) in str(caught.value)


@pytest.mark.parametrize(
    ("rate_per_s", "text"),
    [
        (5.0, "5/s"),
        (2.5, "150/m"),
        (0.5, "30/m"),
        (1 / 3600, "1/h"),
        (1 / 7200, "0.5/h"),
        (1234567.25, "74074035/m"),
    ],
)
def test_rates_are_written_in_the_roundest_unit(rate_per_s: float, text: str) -> None:
    assert rate_text(rate_per_s) == text
    # And read back as the same rate.
    parsed = RuleSet.parse(f"cluster rate={text}").rule_for(CLUSTER)
    assert parsed is not None
    assert parsed.limit.rate_per_s == pytest.approx(rate_per_s, rel=1e-9, abs=0)


def test_a_paused_each_scope_leaves_out_every_value() -> None:
    each = Exclusions.of([LimitKey(scope=Scope.TASK, value="*")])
    assert each.everything
    hosts = Exclusions.of([LimitKey(scope=Scope.HOST, value="*")])
    assert not hosts.everything
    assert "*" in hosts.hosts


def test_a_task_of_a_paused_each_scope_says_paused() -> None:
    until = NOW + timedelta(minutes=1)
    board = WaitingBoard(
        relay_id="r", written_at=NOW, paused={LimitKey(scope=Scope.HOST, value="*"): until}
    )
    keys = [CLUSTER, GREETING, LimitKey(scope=Scope.HOST, value="example.com")]
    waiting = why_waiting(status=TaskStatus.PENDING, run_at=None, keys=keys, board=board, now=NOW)
    assert waiting is not None
    assert waiting.reason is Reason.PAUSED
    assert waiting.until == until
