"""The RELAY_LIMITS grammar: the README's examples parse, malformed rules are quoted."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.support import ROOT
from throttler.limits import (
    EACH,
    Limit,
    LimitKey,
    LimitRuleError,
    RuleSet,
    Scope,
    parse_rule,
)

README = ROOT / "README.md"
# The README marks the block of examples this test reads, so the docs cannot drift.
EXAMPLES_MARKER = "<!-- relay-limits-examples -->"


def readme_examples() -> list[str]:
    """Return the value of every ``RELAY_LIMITS=...`` line in the marked README block."""
    text = README.read_text()
    assert EXAMPLES_MARKER in text, f"README.md lost its {EXAMPLES_MARKER} marker"
    after = text.split(EXAMPLES_MARKER, 1)[1]
    block = re.search(r"```[a-z]*\n(?P<body>.*?)```", after, re.DOTALL)
    assert block is not None, "no fenced block after the examples marker"
    examples = []
    for line in block["body"].splitlines():
        words = shlex.split(line, comments=True)
        examples += [w.split("=", 1)[1] for w in words if w.startswith("RELAY_LIMITS=")]
    return examples


def test_the_readme_has_examples() -> None:
    assert len(readme_examples()) >= 3


@pytest.mark.parametrize("text", readme_examples())
def test_every_readme_example_parses(text: str) -> None:
    rules = RuleSet.parse(text)
    assert len(rules.rules) == len([part for part in text.split(";") if part.strip()])


def test_a_rule_parses_to_its_settings() -> None:
    rule = parse_rule("host:* rate=1/s burst=3 inflight=2")
    assert (rule.scope, rule.value, rule.is_each) == (Scope.HOST, EACH, True)
    assert rule.limit == Limit(rate_per_s=1.0, burst=3, inflight=2)
    assert rule.text == "host:* rate=1/s burst=3 inflight=2"


@pytest.mark.parametrize(
    ("rate", "per_s"), [("5/s", 5.0), ("30/m", 0.5), ("36/h", 0.01), ("2.5/s", 2.5)]
)
def test_rate_units(rate: str, per_s: float) -> None:
    assert parse_rule(f"cluster rate={rate}").limit.rate_per_s == pytest.approx(per_s)


def test_defaults_burst_1_and_no_inflight_cap() -> None:
    assert parse_rule("task:greeting rate=2/s").limit == Limit(rate_per_s=2.0, burst=1)
    assert parse_rule("account:* inflight=4").limit == Limit(rate_per_s=None, inflight=4)


def test_empty_text_and_stray_separators_give_no_rules() -> None:
    assert not RuleSet.parse("")
    assert not RuleSet.parse(" ; ;")
    assert len(RuleSet.parse(";task:greeting rate=1/s;;").rules) == 1


# (id, the malformed rule, a fragment the error must contain besides the quoted rule)
MALFORMED = [
    ("unknown-scope", "tenant:acme rate=1/s", "unknown scope 'tenant'"),
    ("missing-value", "host: rate=1/s", "needs a value"),
    ("missing-setting-value", "task:greeting rate=", "not key=value"),
    ("bad-rate-unit", "task:greeting rate=5/d", "not <N>/<s|m|h>"),
    ("rate-without-unit", "task:greeting rate=5", "not <N>/<s|m|h>"),
    ("rate-zero", "task:greeting rate=0/s", "above zero"),
    ("rate-negative", "task:greeting rate=-1/s", "not <N>/<s|m|h>"),
    ("burst-without-rate", "host:* burst=5", "burst= needs a rate="),
    ("burst-zero", "host:* rate=1/s burst=0", "burst '0'"),
    ("inflight-negative", "account:* inflight=-1", "inflight '-1'"),
    ("inflight-zero", "account:* inflight=0", "inflight '0'"),
    ("inflight-float", "account:* inflight=1.5", "inflight '1.5'"),
    ("duplicate-setting", "host:* rate=1/s rate=2/s", "rate is given twice"),
    ("unknown-setting", "host:* speed=1/s", "unknown setting 'speed'"),
    ("unknown-task", "task:greet rate=1/s", "no task is named 'greet'"),
    ("cluster-with-value", "cluster:x rate=1/s", "takes no value"),
    ("no-settings", "host:example.com", "has no setting"),
    ("junk-token", "host:* rate=1/s junk", "'junk' is not key=value"),
    ("bad-value", "account:a/b inflight=1", "not a valid account name"),
    ("host-ipv6-unbracketed", "host:::1 rate=1/s", "write an IPv6 host in brackets"),
    ("host-ipv6-zone", "host:[fe80::1%eth0] rate=1/s", "not a valid host name or address"),
    ("host-ipv6-invalid", "host:[1::2::3] rate=1/s", "not an IPv6 address"),
    ("host-ipv4-in-brackets", "host:[127.0.0.1] rate=1/s", "not an IPv6 address"),
    ("host-ipv4-out-of-range", "host:1.2.3.256 rate=1/s", "not a valid IPv4 address"),
    ("host-numeric-label", "host:example.0x rate=1/s", "ends in a number"),
    ("host-with-port", "host:example.com:80 rate=1/s", "write an IPv6 host in brackets"),
    ("host-with-user", "host:me@example.com rate=1/s", "not a valid host name or address"),
]


@pytest.mark.parametrize(
    ("rule", "fragment"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
def test_malformed_rule_fails_quoting_the_rule(rule: str, fragment: str) -> None:
    text = f"task:download rate=5/s; {rule}"
    with pytest.raises(LimitRuleError) as error:
        RuleSet.parse(text)
    message = str(error.value)
    assert repr(rule) in message
    assert fragment in message


@pytest.mark.parametrize(
    "text",
    [
        "host:* rate=1/s; host:* inflight=2",
        "cluster rate=1/s; cluster inflight=2",
        "task:greeting rate=1/s; task:greeting rate=2/s",
        "host:Example.com rate=1/s; host:example.COM rate=2/s",
        "host:127.0.0.1 rate=1/s; host:0x7f000001 rate=2/s",
        "host:[::1] rate=1/s; host:[0:0::1] rate=2/s",
    ],
)
def test_duplicate_scope_fails_quoting_the_second_rule(text: str) -> None:
    second = text.split(";")[1].strip()
    with pytest.raises(LimitRuleError, match="repeats the scope") as error:
        RuleSet.parse(text)
    assert repr(second) in str(error.value)


def _keys_and_limits(rules: RuleSet, **task: str | None) -> dict[str, Limit]:
    name, account = task.pop("name"), task.pop("account")
    assert name is not None
    assert account is not None
    applied = rules.applicable(name=name, account=account, host=task.get("host"))
    return {str(limit.key): limit.limit for limit in applied}


def test_a_specific_rule_overrides_the_each_rule() -> None:
    rules = RuleSet.parse("account:* inflight=20; account:big inflight=100; host:* rate=1/s")

    assert _keys_and_limits(rules, name="greeting", account="small") == {
        "account:small": Limit(inflight=20)
    }
    assert _keys_and_limits(rules, name="greeting", account="big") == {
        "account:big": Limit(inflight=100)
    }
    # `*` gives each value its own key: two hosts never share one bucket.
    assert _keys_and_limits(rules, name="download", account="big", host="a.example") == {
        "account:big": Limit(inflight=100),
        "host:a.example": Limit(rate_per_s=1.0),
    }


def test_every_applicable_scope_is_returned() -> None:
    rules = RuleSet.parse(
        "cluster inflight=50; task:download rate=5/s; account:acme inflight=3; host:* rate=1/s"
    )

    assert _keys_and_limits(rules, name="download", account="acme", host="x.org") == {
        "cluster": Limit(inflight=50),
        "task:download": Limit(rate_per_s=5.0),
        "account:acme": Limit(inflight=3),
        "host:x.org": Limit(rate_per_s=1.0),
    }
    # Only the cluster applies to another account's task that contacts no host.
    assert _keys_and_limits(rules, name="greeting", account="other") == {
        "cluster": Limit(inflight=50)
    }


def test_host_matching_ignores_case() -> None:
    rules = RuleSet.parse("host:Example.COM rate=2/s")

    assert rules.applicable(name="download", account="a", host="EXAMPLE.com")[0].key == LimitKey(
        scope=Scope.HOST, value="example.com"
    )
    each = RuleSet.parse("host:* rate=1/s").applicable(name="download", account="a", host="A.Org")
    assert [str(limit.key) for limit in each] == ["host:a.org"]


def test_cluster_shorthand_alone() -> None:
    rules = RuleSet.parse("", cluster_rate_per_s=10.0, cluster_burst=5, cluster_inflight=7)

    (applied,) = rules.applicable(name="greeting", account="a")
    assert applied.limit == Limit(rate_per_s=10.0, burst=5, inflight=7)
    assert applied.rule.text == "RELAY_RATE=10 RELAY_BURST=5 RELAY_MAX_INFLIGHT=7"


def test_no_cluster_rule_when_the_shorthand_is_off() -> None:
    assert not RuleSet.parse("", cluster_rate_per_s=0.0, cluster_burst=9, cluster_inflight=0)


@pytest.mark.parametrize(
    ("rule", "rate", "burst", "inflight", "expected"),
    [
        # The lower rate, the smaller burst and the lower cap: both limits hold.
        (
            "cluster rate=2/s burst=20 inflight=3",
            10.0,
            5,
            0,
            Limit(rate_per_s=2.0, burst=5, inflight=3),
        ),
        ("cluster rate=20/s burst=2", 10.0, 5, 4, Limit(rate_per_s=10.0, burst=2, inflight=4)),
        ("cluster inflight=8", 3.0, 4, 6, Limit(rate_per_s=3.0, burst=4, inflight=6)),
        # A cap-only shorthand leaves the rule's rate and burst alone.
        ("cluster rate=5/s burst=10", 0.0, 1, 6, Limit(rate_per_s=5.0, burst=10, inflight=6)),
    ],
)
def test_cluster_shorthand_and_cluster_rule_combine_stricter_wins(
    rule: str, rate: float, burst: int, inflight: int, expected: Limit
) -> None:
    rules = RuleSet.parse(
        rule, cluster_rate_per_s=rate, cluster_burst=burst, cluster_inflight=inflight
    )

    (applied,) = rules.applicable(name="greeting", account="a")
    assert applied.limit == expected
    assert rule in applied.rule.text
    assert "RELAY_" in applied.rule.text
    assert len([r for r in rules.rules if r.scope is Scope.CLUSTER]) == 1


def test_rule_for_falls_back_to_the_each_rule() -> None:
    rules = RuleSet.parse("host:* rate=1/s; host:slow.org rate=1/m")

    assert rules.rule_for(LimitKey(scope=Scope.HOST, value="slow.org")) == parse_rule(
        "host:slow.org rate=1/m"
    )
    each = rules.rule_for(LimitKey(scope=Scope.HOST, value="fast.org"))
    assert each is not None
    assert each.is_each
    assert rules.rule_for(LimitKey(scope=Scope.CLUSTER)) is None
    assert rules.rule_for(LimitKey(scope=Scope.ACCOUNT, value="a")) is None


@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("127.0.0.1", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("[::ffff:127.0.0.1]", "127.0.0.1"),
        ("[::ffff:7f00:1]", "127.0.0.1"),
        ("[::1]", "[::1]"),
        ("[0:0::1]", "[::1]"),
        ("[2001:DB8::A]", "[2001:db8::a]"),
        ("Example.COM.", "example.com"),
    ],
)
def test_a_host_rule_names_the_canonical_key_of_its_host(written: str, key: str) -> None:
    rule = parse_rule(f"host:{written} rate=1/m")
    assert (rule.scope, rule.value) == (Scope.HOST, key)
    # The tasks a download to any spelling of that address creates carry the same key.
    applied = RuleSet((rule,)).applicable(name="download", account="a", host=key)
    assert [str(limit.key) for limit in applied] == [f"host:{key}"]
