"""Count, per limited key, the tasks waiting, in flight and recently dispatched.

One grouped query per scope kind (task name, account, host) plus one for the totals,
however many keys there are.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Integer, Select, case, func, literal_column, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute

from api.schemas import KeyStatus, LimitPublic, RelayStatus, StatusTotals
from throttler.limits import EACH, LimitKey, Rule, RuleSet, Scope
from throttler.models import Task, TaskEvent
from throttler.statuses import INFLIGHT_STATUSES, EventKind, TaskStatus

DISPATCH_WINDOW_S = 60.0

_INFLIGHT = [status.value for status in INFLIGHT_STATUSES]
_LIVE = [TaskStatus.PENDING.value, *_INFLIGHT]
_COLUMNS: dict[Scope, QueryableAttribute[Any]] = {
    Scope.TASK: Task.name,
    Scope.ACCOUNT: Task.account,
    Scope.HOST: Task.host,
}


@dataclass(frozen=True, kw_only=True, slots=True)
class Counts:
    backlog: int = 0
    inflight: int = 0
    dispatched: int = 0


def _counts_query(
    key: ColumnElement[Any] | QueryableAttribute[Any],
    *,
    filters: list[ColumnElement[bool]],
    since: datetime,
) -> Select[str | None, int | None, int | None, int | None]:
    """Backlog, in-flight and recent dispatches grouped by ``key``, in one statement."""
    # Constants are inlined: PostgreSQL cannot type a bound parameter in a UNION column.
    zero: ColumnElement[int] = literal_column("0", Integer)
    one: ColumnElement[int] = literal_column("1", Integer)
    live = select(
        key.label("key"),
        case((Task.status == TaskStatus.PENDING.value, 1), else_=0).label("backlog"),
        case((Task.status.in_(_INFLIGHT), 1), else_=0).label("inflight"),
        zero.label("dispatched"),
    ).where(Task.status.in_(_LIVE), *filters)
    recent = (
        select(key.label("key"), zero, zero, one)
        .select_from(TaskEvent)
        .join(Task, Task.id == TaskEvent.task_id)
        .where(TaskEvent.event == EventKind.QUEUED.value, TaskEvent.at >= since, *filters)
    )
    rows = union_all(live, recent).subquery()
    sums: Select[str | None, int | None, int | None, int | None] = select(
        rows.c.key, func.sum(rows.c.backlog), func.sum(rows.c.inflight), func.sum(rows.c.dispatched)
    ).group_by(rows.c.key)
    return sums


async def _grouped_counts(
    session: AsyncSession,
    key: ColumnElement[Any] | QueryableAttribute[Any],
    *,
    filters: list[ColumnElement[bool]],
    since: datetime,
) -> dict[str | None, Counts]:
    rows = await session.execute(_counts_query(key, filters=filters, since=since))
    return {
        value: Counts(
            backlog=int(backlog or 0), inflight=int(inflight or 0), dispatched=int(dispatched or 0)
        )
        for value, backlog, inflight, dispatched in rows
    }


def _key_status(key: LimitKey, rule: Rule, counts: Counts) -> KeyStatus:
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


async def _scope_statuses(
    session: AsyncSession,
    *,
    scope: Scope,
    rules: list[Rule],
    account: str | None,
    since: datetime,
) -> list[KeyStatus]:
    """Every specific rule of one scope, and each active value of its ``*`` rule."""
    column = _COLUMNS[scope]
    if scope is Scope.ACCOUNT and account is not None:
        # An account sees only its own account key, never another account's limits.
        rules = [rule for rule in rules if rule.value in (account, EACH)]
    each = next((rule for rule in rules if rule.is_each), None)
    specific = {rule.value: rule for rule in rules if rule.value is not None and not rule.is_each}
    if each is None and not specific:
        return []
    filters: list[ColumnElement[bool]] = [column.is_not(None)]
    if account is not None:
        filters.append(Task.account == account)
    if each is None:
        filters.append(column.in_(list(specific)))
    counts = await _grouped_counts(session, column, filters=filters, since=since)
    values = set(specific)
    if each is not None:
        values.update(value for value in counts if value is not None)
    statuses = []
    for value in sorted(values):
        rule = specific.get(value, each)
        if rule is not None:
            key = LimitKey(scope=scope, value=value)
            statuses.append(_key_status(key, rule, counts.get(value, Counts())))
    return statuses


async def relay_status(
    session: AsyncSession, *, rules: RuleSet, account: str | None, now: datetime
) -> RelayStatus:
    """Count each limited key's tasks; with ``account``, only that account's tasks."""
    since = now - timedelta(seconds=DISPATCH_WINDOW_S)
    filters: list[ColumnElement[bool]] = [] if account is None else [Task.account == account]
    everything = await _grouped_counts(
        session, literal_column("'all'"), filters=filters, since=since
    )
    totals = next(iter(everything.values()), Counts())
    cluster_key = LimitKey(scope=Scope.CLUSTER)
    cluster_rule = rules.rule_for(cluster_key)
    keys: list[KeyStatus] = []
    for scope in (Scope.TASK, Scope.ACCOUNT, Scope.HOST):
        scope_rules = [rule for rule in rules.rules if rule.scope is scope]
        if scope_rules:
            keys += await _scope_statuses(
                session, scope=scope, rules=scope_rules, account=account, since=since
            )
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
    )
