"""The rules in force: the environment's rules, overridden by those set through the API.

Each process parses ``RELAY_LIMITS`` (and the cluster shorthand) at start; rules and
pauses set through the API are rows of ``limit_rules`` (throttler.store.limits). An API
row that carries a rule replaces the environment's rule of the same scope whole (for the
cluster: the shorthand too); a row carrying only a pause leaves the environment's rule in
force. ``in_force`` merges the two, pure, so a relay and the API compute the same thing
from the same rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum

from throttler.limits import EACH, Limit, LimitKey, LimitRuleError, Rule, RuleSet, parse_rule

_UNITS = (("s", 1.0), ("m", 60.0), ("h", 3600.0))


class Source(StrEnum):
    """Where a rule in force comes from."""

    ENV = "env"  # RELAY_LIMITS or the cluster shorthand, read at start
    API = "api"  # set through PUT /limits/{scope}, stored in limit_rules


@dataclass(frozen=True, kw_only=True, slots=True)
class Override:
    """One ``limit_rules`` row: a rule set through the API, a pause, or both."""

    key: LimitKey
    limit: Limit | None  # None: the row carries only a pause
    paused_until: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class RuleInForce:
    """One scope as GET /limits shows it."""

    key: LimitKey
    limit: Limit | None
    paused_until: datetime | None
    source: Source


@dataclass(frozen=True, kw_only=True, slots=True)
class RulesInForce:
    """The merged rules a relay obeys, and the scopes paused (until when)."""

    rules: RuleSet
    # Every pause, expired ones included: ``paused_at(now)`` filters them.
    pauses: Mapping[LimitKey, datetime] = field(default_factory=dict)
    sources: Mapping[LimitKey, Source] = field(default_factory=dict)

    def paused_at(self, now: datetime) -> dict[LimitKey, datetime]:
        """The scopes still paused at ``now``, each with the pause's end."""
        return {key: until for key, until in self.pauses.items() if until > now}

    def listing(self, *, now: datetime) -> list[RuleInForce]:
        """Every rule in force and every pause still running, ordered by scope."""
        keys: dict[LimitKey, None] = {key_of(rule): None for rule in self.rules.rules}
        paused = self.paused_at(now)
        for key in paused:
            keys[key] = None
        own = {key_of(rule): rule for rule in self.rules.rules}
        listed = []
        for key in sorted(keys, key=_order):
            found = own.get(key)
            listed.append(
                RuleInForce(
                    key=key,
                    limit=None if found is None else found.limit,
                    paused_until=paused.get(key),
                    source=self.sources.get(key, Source.API),
                )
            )
        return listed


def key_of(rule: Rule) -> LimitKey:
    return LimitKey(scope=rule.scope, value=rule.value)


def _order(key: LimitKey) -> tuple[int, str]:
    scopes = [scope.value for scope in type(key.scope)]
    return scopes.index(key.scope.value), key.value or ""


def in_force(env: RuleSet, overrides: Iterable[Override]) -> RulesInForce:
    """Merge the environment's rules with the API's rows (an API rule wins)."""
    rules = {key_of(rule): rule for rule in env.rules}
    sources = dict.fromkeys(rules, Source.ENV)
    pauses: dict[LimitKey, datetime] = {}
    for override in overrides:
        if override.limit is not None:
            rules[override.key] = Rule(
                scope=override.key.scope,
                value=override.key.value,
                limit=override.limit,
                text=rule_text(override.key, override.limit),
            )
            sources[override.key] = Source.API
        if override.paused_until is not None:
            pauses[override.key] = override.paused_until
    return RulesInForce(rules=RuleSet(tuple(rules.values())), pauses=pauses, sources=sources)


def parse_scope(text: str) -> LimitKey:
    """Read a scope as a rule names it (``host:127.1`` is ``host:127.0.0.1``); raise
    LimitRuleError quoting it."""
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise LimitRuleError(f"scope {text!r} is not a scope such as cluster or task:greeting")
    try:
        rule = parse_rule(f"{text} inflight=1")
    except LimitRuleError as error:
        # The message quotes the probe rule: name the scope as the caller wrote it.
        probe = repr(f"{text} inflight=1")
        raise LimitRuleError(str(error).replace(f"rule {probe}", f"scope {text!r}")) from None
    return key_of(rule)


def rate_text(rate_per_s: float) -> str:
    """A rate as a rule writes it: a whole number in the first unit that has one (``5/s``;
    ``300/m`` reads back as ``5/s``, ``2.5/s`` as ``150/m``), else decimals."""
    for unit, seconds in _UNITS:
        count = rate_per_s * seconds
        if count >= 1 and math.isclose(count, round(count), rel_tol=1e-9):
            return f"{round(count)}/{unit}"
    # No whole number in any unit: the smallest unit with at least one, in plain decimals
    # (the grammar has no exponent).
    unit, seconds = next(((u, s) for u, s in _UNITS if rate_per_s * s >= 1), _UNITS[-1])
    return f"{rate_per_s * seconds:.9f}".rstrip("0").rstrip(".") + f"/{unit}"


def rule_text(key: LimitKey, limit: Limit) -> str:
    """The rule as ``RELAY_LIMITS`` would write it (what status pages show)."""
    words = [str(key)]
    if limit.rate_per_s is not None:
        words += [f"rate={rate_text(limit.rate_per_s)}", f"burst={limit.burst}"]
    if limit.inflight is not None:
        words.append(f"inflight={limit.inflight}")
    return " ".join(words)


def is_each(key: LimitKey) -> bool:
    return key.value == EACH
