"""Flow-control rules: the ``RELAY_LIMITS`` grammar and which rules apply to a task.

A rule is a scope and one or more settings, rules separated by ``;``::

    <scope> [rate=<N>/<s|m|h>] [burst=<B>] [inflight=<M>]

Scopes: ``cluster``, ``task:<name>``, ``account:<id>``, ``host:<hostname>`` (an IP address
in any spelling, IPv6 in brackets, folds to one key: see throttler.hosts),
``key:<prefix>:<value>`` (a label given at submission, throttler.labels); ``*`` in place
of a name gives every distinct value its own limit, and a rule for a specific value
overrides the ``*`` rule of its scope. For ``key:`` the ``*`` takes the value's place
under one prefix (``key:connector:*``: each ``connector:<v>`` label its own limit,
``key:connector:salesforce`` overriding it for that label). ``key:*`` alone is refused: a
prefix names one dimension (connector, tenant), and one limit per label across every
dimension would make a task labelled ``connector:x`` and ``tenant:y`` obey the same rule
twice under two meanings; a rule must say which dimension it limits. ``RELAY_RATE``,
``RELAY_BURST`` and ``RELAY_MAX_INFLIGHT`` are shorthand for the ``cluster`` rule.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from throttler.catalog import CATALOG
from throttler.hosts import host_key
from throttler.labels import GRAMMAR as LABEL_GRAMMAR
from throttler.labels import is_label

EACH = "*"
_SECONDS_PER_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(r"^(?P<count>\d+(?:\.\d+)?)/(?P<unit>[smh])$")
_INTEGER = re.compile(r"^\d+$")
_VALUE = re.compile(r"^[A-Za-z0-9_.\-@]+$")
# A host name or IPv4 address in any spelling, or an IPv6 address in brackets (no zone id).
_HOST = re.compile(r"^(?:[A-Za-z0-9_.\-]+|\[[0-9A-Fa-f:.]+\])$")
# A key: rule's wildcard, written after the label's prefix and its colon.
_EACH_SUFFIX = ":" + EACH
# Values remembered per scope by ``RuleSet.applicable``: under a MB each (measured), and
# more than a claim has rows, so values that recur from claim to claim stay remembered.
_MEMO_SIZE = 4_096


class LimitRuleError(ValueError):
    """A rule of ``RELAY_LIMITS`` is malformed; the message quotes it."""


class Scope(StrEnum):
    """What a rule limits; the part of a rule before the colon."""

    CLUSTER = "cluster"  # every task
    TASK = "task"  # tasks of one name
    ACCOUNT = "account"  # tasks of one account
    HOST = "host"  # download tasks to one hostname
    KEY = "key"  # tasks carrying one label (prefix:value)


@dataclass(frozen=True, kw_only=True, slots=True)
class Limit:
    """The settings of one rule; ``None`` means that dimension is not limited."""

    rate_per_s: float | None = None
    burst: int = 1
    inflight: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class Rule:
    """One parsed rule: its scope, the value it names (``*`` for each), its limit."""

    scope: Scope
    value: str | None  # None for the cluster scope
    limit: Limit
    text: str  # the rule as written, for status pages and errors

    @property
    def is_each(self) -> bool:
        return is_each_value(self.scope, self.value)


@dataclass(frozen=True, kw_only=True, slots=True)
class LimitKey:
    """One limited thing: the cluster, or one task name, account, host or label."""

    scope: Scope
    value: str | None = None

    def __str__(self) -> str:
        return self.scope.value if self.value is None else f"{self.scope.value}:{self.value}"


@dataclass(frozen=True, kw_only=True, slots=True)
class AppliedLimit:
    """A limit in force for one key, and the rule it comes from."""

    key: LimitKey
    limit: Limit
    rule: Rule


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Every rule in force, indexed so that a task's rules are found without a scan."""

    rules: tuple[Rule, ...]
    _index: dict[tuple[Scope, str | None], Rule] = field(
        init=False, repr=False, compare=False, hash=False
    )
    # The cluster's limit (applies to every task), found once.
    _cluster: AppliedLimit | None = field(init=False, repr=False, compare=False, hash=False)
    # Per scope that has a rule: value -> its limit (None: none), filled as values are met.
    # A relay asks about the same few names, accounts, hosts and labels for every row of
    # every claim; building their keys and limits anew cost more than the rest of a row.
    _memo: dict[Scope, dict[str, AppliedLimit | None]] = field(
        init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        index = {(rule.scope, rule.value): rule for rule in self.rules}
        object.__setattr__(self, "_index", index)
        cluster = index.get((Scope.CLUSTER, None))
        applied = (
            None
            if cluster is None
            else AppliedLimit(key=LimitKey(scope=Scope.CLUSTER), limit=cluster.limit, rule=cluster)
        )
        object.__setattr__(self, "_cluster", applied)
        scoped = {rule.scope for rule in self.rules if rule.scope is not Scope.CLUSTER}
        object.__setattr__(self, "_memo", {scope: {} for scope in scoped})

    @classmethod
    def parse(
        cls,
        text: str,
        *,
        cluster_rate_per_s: float = 0.0,
        cluster_burst: int = 1,
        cluster_inflight: int = 0,
    ) -> RuleSet:
        """Parse ``RELAY_LIMITS`` plus the cluster shorthand; raise LimitRuleError."""
        rules: dict[tuple[Scope, str | None], Rule] = {}
        explicit: set[tuple[Scope, str | None]] = set()
        for raw in text.split(";"):
            written = raw.strip()
            if not written:
                continue
            rule = parse_rule(written)
            identity = (rule.scope, rule.value)
            if identity in explicit:
                raise LimitRuleError(f"rule {written!r} repeats the scope of an earlier rule")
            explicit.add(identity)
            rules[identity] = rule
        shorthand = _shorthand_rule(
            rate_per_s=cluster_rate_per_s, burst=cluster_burst, inflight=cluster_inflight
        )
        if shorthand is not None:
            cluster = rules.get((Scope.CLUSTER, None))
            if cluster is not None:
                # RELAY_LIMITS' own cluster rule and the shorthand variables combine;
                # each dimension set in both keeps the stricter value.
                shorthand = Rule(
                    scope=Scope.CLUSTER,
                    value=None,
                    limit=_stricter(cluster.limit, shorthand.limit),
                    text=f"{cluster.text} + {shorthand.text}",
                )
            rules[(Scope.CLUSTER, None)] = shorthand
        return cls(tuple(rules.values()))

    def applicable(
        self,
        *,
        name: str,
        account: str,
        host: str | None = None,
        labels: Iterable[str] = (),
    ) -> list[AppliedLimit]:
        """Return the limits a task of this name, account, host and labels must satisfy."""
        applied: list[AppliedLimit] = [] if self._cluster is None else [self._cluster]
        memo = self._memo
        if not memo:
            return applied
        if Scope.TASK in memo:
            self._add(applied, memo[Scope.TASK], Scope.TASK, name)
        if Scope.ACCOUNT in memo:
            self._add(applied, memo[Scope.ACCOUNT], Scope.ACCOUNT, account)
        if host and Scope.HOST in memo:
            self._add(applied, memo[Scope.HOST], Scope.HOST, host.lower())
        if Scope.KEY in memo:
            known = memo[Scope.KEY]
            for label in labels:
                self._add(applied, known, Scope.KEY, label)
        return applied

    def _add(
        self,
        applied: list[AppliedLimit],
        known: dict[str, AppliedLimit | None],
        scope: Scope,
        value: str,
    ) -> None:
        """Append the limit of ``scope:value``, if a rule has one, remembering the answer."""
        try:
            found = known[value]
        except KeyError:
            key = LimitKey(scope=scope, value=value)
            rule = self.rule_for(key)
            found = None if rule is None else AppliedLimit(key=key, limit=rule.limit, rule=rule)
            if len(known) >= _MEMO_SIZE:
                # Bounded: a process meeting ever new accounts or hosts starts over.
                known.clear()
            known[value] = found
        if found is not None:
            applied.append(found)

    def rule_for(self, key: LimitKey) -> Rule | None:
        """Return the rule limiting ``key``: its own rule, else its scope's ``*`` rule."""
        own = self._index.get((key.scope, key.value))
        if own is not None or key.scope is Scope.CLUSTER:
            return own
        return self._index.get((key.scope, each_value(key)))

    def __bool__(self) -> bool:
        return bool(self.rules)

    def scopes(self) -> Iterable[Scope]:
        return {rule.scope for rule in self.rules}


def each_value(key: LimitKey) -> str:
    """The value a ``*`` rule covering ``key`` has: ``*``, or ``<prefix>:*`` for a label."""
    if key.scope is Scope.KEY and key.value is not None:
        prefix, _, _ = key.value.partition(":")
        return prefix + _EACH_SUFFIX
    return EACH


def is_each_value(scope: Scope, value: str | None) -> bool:
    """Whether a rule's value gives every distinct value its own limit (``*``, ``p:*``)."""
    if value is None:
        return False
    return value.endswith(_EACH_SUFFIX) if scope is Scope.KEY else value == EACH


def parse_rule(text: str) -> Rule:
    """Parse one rule such as ``host:* rate=1/s burst=1``; raise LimitRuleError."""
    parts = text.split()
    scope, value = _parse_scope(parts[0], text)
    if len(parts) == 1:
        raise LimitRuleError(f"rule {text!r} has no setting (rate=, burst= or inflight=)")
    settings: dict[str, str] = {}
    for part in parts[1:]:
        key, sep, setting = part.partition("=")
        if not sep or not setting:
            raise LimitRuleError(f"rule {text!r}: {part!r} is not key=value")
        if key not in ("rate", "burst", "inflight"):
            raise LimitRuleError(f"rule {text!r}: unknown setting {key!r}")
        if key in settings:
            raise LimitRuleError(f"rule {text!r}: {key} is given twice")
        settings[key] = setting
    if "burst" in settings and "rate" not in settings:
        raise LimitRuleError(f"rule {text!r}: burst= needs a rate=")
    limit = Limit(
        rate_per_s=_parse_rate(settings["rate"], text) if "rate" in settings else None,
        burst=_parse_positive(settings.get("burst", "1"), "burst", text),
        inflight=(
            _parse_positive(settings["inflight"], "inflight", text)
            if "inflight" in settings
            else None
        ),
    )
    return Rule(scope=scope, value=value, limit=limit, text=text)


def _parse_scope(written: str, text: str) -> tuple[Scope, str | None]:
    kind, sep, value = written.partition(":")
    try:
        scope = Scope(kind)
    except ValueError:
        known = ", ".join(s.value for s in Scope)
        raise LimitRuleError(f"rule {text!r}: unknown scope {kind!r} (one of {known})") from None
    if scope is Scope.CLUSTER:
        if sep:
            raise LimitRuleError(f"rule {text!r}: the cluster scope takes no value")
        return scope, None
    if scope is Scope.KEY:
        return scope, _parse_label_value(value, text)
    if not value:
        raise LimitRuleError(f"rule {text!r}: scope {kind!r} needs a value, e.g. {kind}:*")
    if scope is Scope.HOST and value != EACH:
        return scope, _parse_host(value, text)
    if value != EACH and not _VALUE.match(value):
        raise LimitRuleError(f"rule {text!r}: {value!r} is not a valid {kind} name")
    if scope is Scope.TASK and value != EACH and value not in CATALOG:
        raise LimitRuleError(f"rule {text!r}: no task is named {value!r}")
    return scope, value


def _parse_label_value(value: str, text: str) -> str:
    """A ``key:`` rule's label (``prefix:value``) or its prefix's wildcard (``prefix:*``)."""
    if value == EACH:
        # See the module's docstring: a rule must name the dimension (prefix) it limits.
        raise LimitRuleError(
            f"rule {text!r}: key:* names no label prefix; write key:<prefix>:* "
            "(e.g. key:connector:*) or key:<prefix>:<value>"
        )
    if value.endswith(_EACH_SUFFIX):
        # Checked as a label with a stand-in value: the prefix's grammar is the label's.
        # Only a whole value is a wildcard: "connector:eu:*" is no prefix's.
        prefix = value[: -len(_EACH_SUFFIX)]
        if ":" in prefix or not is_label(prefix + ":x"):
            raise LimitRuleError(
                f"rule {text!r}: {value!r} is not <prefix>:* with a label prefix ({LABEL_GRAMMAR})"
            )
        return value
    if not is_label(value):
        raise LimitRuleError(
            f"rule {text!r}: {value!r} is not a label, key:<prefix>:<value> or key:<prefix>:* "
            f"({LABEL_GRAMMAR})"
        )
    return value


def _parse_host(value: str, text: str) -> str:
    """The key of a ``host:`` rule's host: the one tasks.host holds for every spelling."""
    if ":" in value and not value.startswith("["):
        # One way to write IPv6, the URL's: "host:::1" reads as a typo of the scope.
        raise LimitRuleError(f"rule {text!r}: write an IPv6 host in brackets, e.g. host:[{value}]")
    if not _HOST.match(value):
        raise LimitRuleError(f"rule {text!r}: {value!r} is not a valid host name or address")
    try:
        return host_key(value)
    except ValueError as error:
        raise LimitRuleError(f"rule {text!r}: {error}") from None


def _parse_rate(setting: str, text: str) -> float:
    match = _RATE.match(setting)
    if not match:
        raise LimitRuleError(f"rule {text!r}: rate {setting!r} is not <N>/<s|m|h>")
    rate = float(match["count"]) / _SECONDS_PER_UNIT[match["unit"]]
    if rate <= 0:
        raise LimitRuleError(f"rule {text!r}: rate must be above zero")
    return rate


def _parse_positive(setting: str, key: str, text: str) -> int:
    if not _INTEGER.match(setting) or int(setting) < 1:
        raise LimitRuleError(f"rule {text!r}: {key} {setting!r} is not an integer >= 1")
    return int(setting)


def _shorthand_rule(*, rate_per_s: float, burst: int, inflight: int) -> Rule | None:
    """The cluster rule spelled by RELAY_RATE, RELAY_BURST and RELAY_MAX_INFLIGHT, if any."""
    if rate_per_s <= 0 and inflight <= 0:
        return None
    words = []
    if rate_per_s > 0:
        words += [f"RELAY_RATE={rate_per_s:g}", f"RELAY_BURST={burst}"]
    if inflight > 0:
        words.append(f"RELAY_MAX_INFLIGHT={inflight}")
    limit = Limit(
        rate_per_s=rate_per_s if rate_per_s > 0 else None,
        burst=burst,
        inflight=inflight if inflight > 0 else None,
    )
    return Rule(scope=Scope.CLUSTER, value=None, limit=limit, text=" ".join(words))


def _stricter(first: Limit, second: Limit) -> Limit:
    """Combine two limits on one key so that both hold: each dimension's lower value.

    The lower rate alone is not enough: the other limit's smaller burst must hold too,
    or a full bucket could release more at once than that limit allows.
    """
    rated = [limit for limit in (first, second) if limit.rate_per_s is not None]
    caps = [limit.inflight for limit in (first, second) if limit.inflight is not None]
    return Limit(
        rate_per_s=min(limit.rate_per_s or 0.0 for limit in rated) if rated else None,
        burst=min(limit.burst for limit in rated) if rated else 1,
        inflight=min(caps) if caps else None,
    )
