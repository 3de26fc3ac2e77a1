"""Count, per limited key, the tasks waiting, in flight and recently dispatched.

Which keys to show comes from the limit rules; the counts come from the read store in one
grouped query per scope kind (task name, account, host, label) plus one for the totals,
however many keys there are. Whether any relay is alive comes from the node registry
(throttler.nodes): without one, nothing pending is ever dispatched.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta

from api.schemas import KeyStatus, LimitPublic, RelayStatus, StatusTotals
from throttler.errors import REDIS_ERRORS
from throttler.limits import EACH, LimitKey, Rule, RuleSet, Scope
from throttler.nodes import NodeKind, NodeRegistry
from throttler.store.reads import KeyCounts, ReadStore, ScopeCountsQuery

DISPATCH_WINDOW_S = 60.0
_SCOPES = (Scope.TASK, Scope.ACCOUNT, Scope.HOST, Scope.KEY)
NO_RELAY_NOTE = "no relay is alive: pending tasks are not dispatched until one runs"
RELAYS_UNKNOWN_NOTE = "Redis unavailable: cannot tell whether a relay is alive"


async def relays_alive(registry: NodeRegistry) -> int | None:
    """How many relays heartbeat now; None when Redis cannot be asked."""
    try:
        return await registry.alive_count(NodeKind.RELAY)
    except REDIS_ERRORS:
        # The counts come from the database and still stand; only this one is unknown.
        return None


def _relays_note(alive: int | None) -> str | None:
    if alive is None:
        return RELAYS_UNKNOWN_NOTE
    return NO_RELAY_NOTE if alive == 0 else None


def _key_status(key: LimitKey, rule: Rule, counts: KeyCounts) -> KeyStatus:
    limit = rule.limit
    return KeyStatus(
        key=str(key),
        rule=rule.text,
        limit=LimitPublic(
            rate_per_s=limit.rate_per_s,
            burst=limit.burst if limit.rate_per_s is not None else None,
            inflight=limit.inflight,
        ),
        backlog=counts.backlog,
        inflight=counts.inflight,
        dispatched_last_minute=counts.dispatched,
    )


def _visible_rules(rules: RuleSet, scope: Scope, *, account: str | None) -> list[Rule]:
    """The rules of one scope kind the caller may see."""
    scope_rules = [rule for rule in rules.rules if rule.scope is scope]
    if scope is Scope.ACCOUNT and account is not None:
        # An account sees only its own account key, never another account's limits.
        scope_rules = [rule for rule in scope_rules if rule.value in (account, EACH)]
    return scope_rules


def _specific(rules: list[Rule]) -> dict[str, Rule]:
    return {rule.value: rule for rule in rules if rule.value is not None and not rule.is_each}


def _each(rules: list[Rule]) -> Rule | None:
    return next((rule for rule in rules if rule.is_each), None)


def _counts_query(scope: Scope, rules: list[Rule]) -> ScopeCountsQuery | None:
    """Every value of a scope with a ``*`` rule, else only its specific rules' values.

    ``key:`` rules: the specific labels, and every label under a ``key:<prefix>:*`` rule.
    """
    specific = _specific(rules)
    if scope is Scope.KEY:
        prefixes = frozenset(
            rule.value.partition(":")[0] for rule in rules if rule.is_each and rule.value
        )
        if not specific and not prefixes:
            return None
        return ScopeCountsQuery(scope=scope, only=frozenset(specific), prefixes=prefixes)
    if _each(rules) is not None:
        return ScopeCountsQuery(scope=scope)
    if specific:
        return ScopeCountsQuery(scope=scope, only=frozenset(specific))
    return None


def _scope_statuses(
    scope: Scope, rules: list[Rule], counts: Mapping[str, KeyCounts] | None
) -> list[KeyStatus]:
    """Every specific rule of one scope, and each active value of its ``*`` rules."""
    if counts is None:
        return []
    # The scope's rules alone, so that each value finds its rule as the relay does: its
    # own, else its ``*`` rule (a label: its prefix's).
    scope_rules = RuleSet(tuple(rules))
    values = set(_specific(rules)) | set(counts)
    statuses = []
    for value in sorted(values):
        rule = scope_rules.rule_for(LimitKey(scope=scope, value=value))
        if rule is not None:
            key = LimitKey(scope=scope, value=value)
            statuses.append(_key_status(key, rule, counts.get(value, KeyCounts())))
    return statuses


async def relay_status(
    reads: ReadStore,
    *,
    rules: RuleSet,
    account: str | None,
    now: datetime,
    alive_relays: int | None,
) -> RelayStatus:
    """Count each limited key's tasks; with ``account``, only that account's tasks."""
    visible = {scope: _visible_rules(rules, scope, account=account) for scope in _SCOPES}
    queries = [
        query
        for scope, scope_rules in visible.items()
        if (query := _counts_query(scope, scope_rules)) is not None
    ]
    counts = await reads.relay_counts(
        scopes=queries, account=account, since=now - timedelta(seconds=DISPATCH_WINDOW_S)
    )
    keys: list[KeyStatus] = []
    for scope, scope_rules in visible.items():
        keys += _scope_statuses(scope, scope_rules, counts.by_scope.get(scope))
    cluster_key = LimitKey(scope=Scope.CLUSTER)
    cluster_rule = rules.rule_for(cluster_key)
    totals = counts.totals
    return RelayStatus(
        account=account,
        as_of=now,
        cluster=None if cluster_rule is None else _key_status(cluster_key, cluster_rule, totals),
        keys=keys,
        totals=StatusTotals(
            pending=totals.backlog,
            inflight=totals.inflight,
            dispatched_last_minute=totals.dispatched,
        ),
        relays_alive=alive_relays,
        note=_relays_note(alive_relays),
    )
