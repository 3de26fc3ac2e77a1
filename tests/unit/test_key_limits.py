"""``key:`` limit rules: their grammar, which rule a label finds, and what the relay's
pure parts (limiter plan, in-flight caps, exclusions, waiting keys) make of labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from throttler.limits import LimitKey, LimitRuleError, RuleSet, Scope, parse_rule
from throttler.settings import load_settings
from throttler.statuses import TaskStatus
from throttler.store.outbox import Exclusions
from throttler.throttle import Candidate, InflightCaps, plan
from throttler.waiting import Reason, Waiting, WaitingBoard, task_keys, why_waiting

RULES = (
    "key:connector:* inflight=2; key:connector:salesforce inflight=5; "
    "key:tenant:acme rate=50/s burst=3"
)


def _key(label: str) -> LimitKey:
    return LimitKey(scope=Scope.KEY, value=label)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("key:connector:salesforce inflight=2", "connector:salesforce"),
        ("key:connector:* inflight=2", "connector:*"),
        ("key:tenant:ACME rate=5/s", "tenant:ACME"),  # a value keeps its case
        ("key:slot:10:30 inflight=1", "slot:10:30"),  # a value may hold colons
        ("key:a_b-c:x@y.z inflight=1", "a_b-c:x@y.z"),
    ],
)
def test_good_key_rules(text: str, value: str) -> None:
    rule = parse_rule(text)
    assert (rule.scope, rule.value, rule.text) == (Scope.KEY, value, text)
    assert rule.is_each == value.endswith(":*")


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("key:* inflight=1", "names no label prefix"),
        ("key inflight=1", "not a label"),
        ("key: inflight=1", "not a label"),
        ("key:connector inflight=1", "not a label"),
        ("key:connector: inflight=1", "not a label"),
        ("key:Connector:x inflight=1", "not a label"),  # prefixes are lowercase only
        ("key:Connector:* inflight=1", "not <prefix>:*"),
        ("key:connector:eu:* inflight=1", "not <prefix>:*"),  # only a whole value is '*'
        ("key:connector:sales* inflight=1", "not a label"),
        ("key:connector:a/b inflight=1", "not a label"),
        ("key:connector:*x inflight=1", "not a label"),
        ("key:connector:x", "has no setting"),
    ],
)
def test_bad_key_rules_quote_the_rule(text: str, says: str) -> None:
    with pytest.raises(LimitRuleError) as raised:
        parse_rule(text)
    assert repr(text) in str(raised.value)
    assert says in str(raised.value)


def test_a_key_rule_repeated_is_refused() -> None:
    with pytest.raises(LimitRuleError, match="repeats"):
        RuleSet.parse("key:connector:* inflight=1; key:connector:* rate=1/s")


def test_a_label_finds_its_own_rule_over_its_prefixs_wildcard() -> None:
    rules = RuleSet.parse(RULES)
    found = {
        str(a.key): a.rule.text
        for a in rules.applicable(
            name="greeting",
            account="a",
            labels=("connector:hubspot", "connector:salesforce", "other:x", "tenant:acme"),
        )
    }
    assert found == {
        "key:connector:hubspot": "key:connector:* inflight=2",
        "key:connector:salesforce": "key:connector:salesforce inflight=5",
        "key:tenant:acme": "key:tenant:acme rate=50/s burst=3",
    }
    # No wildcard for tenant: another tenant is not limited; nor is a prefix's look-alike.
    assert rules.rule_for(_key("tenant:other")) is None
    assert rules.rule_for(_key("connectors:x")) is None


def test_caps_and_buckets_per_label() -> None:
    rules = RuleSet.parse(RULES)
    caps = InflightCaps(rules)
    assert caps.cap(_key("connector:x")) == 2
    assert caps.cap(_key("connector:salesforce")) == 5
    assert caps.cap(_key("tenant:acme")) is None
    both = Candidate(
        task_id="t", name="greeting", account="a", labels=("connector:x", "tenant:acme")
    )
    assert caps.keys(both) == [_key("connector:x")]
    planned = plan(rules, [both, Candidate(task_id="u", name="greeting", account="a")])
    assert [(b.key, b.rate_per_s, b.burst) for b in planned.buckets] == [
        (_key("tenant:acme"), 50.0, 3)
    ]
    assert [r.buckets for r in planned.requests] == [(0,), ()]


def test_the_cap_counts_each_label_and_a_task_obeys_both_of_its_labels() -> None:
    caps = InflightCaps(RuleSet.parse("key:connector:* inflight=1; key:tenant:* inflight=2"))
    tasks = [
        Candidate(task_id="1", name="greeting", account="a", labels=("connector:x", "tenant:a")),
        Candidate(task_id="2", name="greeting", account="a", labels=("connector:x", "tenant:b")),
        Candidate(task_id="3", name="greeting", account="a", labels=("connector:y", "tenant:a")),
        Candidate(task_id="4", name="greeting", account="a", labels=("connector:z", "tenant:a")),
        Candidate(task_id="5", name="greeting", account="a"),
    ]
    kept, left_out = caps.fit(tasks, {})
    # 2: connector:x is full after 1; 4: tenant:a is full after 1 and 3.
    assert [c.task_id for c in kept] == ["1", "3", "5"]
    assert left_out
    assert caps.full({_key("connector:x"): 1, _key("tenant:a"): 1}) == {_key("connector:x")}


def test_excluded_labels_are_their_own_set() -> None:
    excluding = Exclusions.of([_key("connector:x"), LimitKey(scope=Scope.HOST, value="h")])
    assert excluding.labels == frozenset({"connector:x"})
    assert excluding.hosts == frozenset({"h"})
    assert not excluding.everything


def test_a_tasks_waiting_keys_include_its_labels() -> None:
    keys = task_keys(name="greeting", account="a", host=None, labels=("connector:x", "tenant:b"))
    assert [str(key) for key in keys] == [
        "cluster",
        "task:greeting",
        "account:a",
        "key:connector:x",
        "key:tenant:b",
    ]


def test_why_waiting_names_the_key_scope_and_boards_keep_label_keys() -> None:
    now = datetime(2026, 11, 29, tzinfo=UTC)
    board = WaitingBoard(
        relay_id="r",
        written_at=now,
        inflight=frozenset({_key("slot:10:30")}),
        rate={_key("tenant:acme"): now + timedelta(seconds=1)},
    )
    # A label's key, colons and all, survives the board's trip through Redis.
    board = WaitingBoard.decode(board.encode())
    keys = task_keys(name="greeting", account="a", host=None, labels=("slot:10:30",))
    waiting = why_waiting(status=TaskStatus.PENDING, run_at=None, keys=keys, board=board, now=now)
    assert waiting == Waiting(reason=Reason.INFLIGHT, scope=_key("slot:10:30"))
    keys = task_keys(name="greeting", account="a", host=None, labels=("tenant:acme",))
    waiting = why_waiting(status=TaskStatus.PENDING, run_at=None, keys=keys, board=board, now=now)
    assert waiting == Waiting(
        reason=Reason.RATE, scope=_key("tenant:acme"), until=now + timedelta(seconds=1)
    )


def test_a_malformed_key_rule_stops_the_process_quoting_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("RELAY_LIMITS", "key:connector:* inflight=2; key:* inflight=1")
    with pytest.raises(SystemExit) as exit_info:
        load_settings()
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("invalid setting RELAY_LIMITS: ")
    assert "rule 'key:* inflight=1'" in message
