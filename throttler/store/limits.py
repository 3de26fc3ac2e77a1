"""Rules and pauses set through the API: ``limit_rules`` rows and their ``limit_changes``.

Every change is one transaction: the scope's row is read, changed (or removed) and a
``limit_changes`` row appended with the row before and after, so ``max(limit_changes.id)``
is a version that moves with every change; relays read it cheaply and reload the rows
only when it moved. On PostgreSQL a change takes the claims' advisory lock first, so it
is ordered with the claims that count in-flight caps: a claim that reads the version
after taking that lock sees every change that answered before (SQLite runs one writer at
a time anyway: ``BEGIN IMMEDIATE``). Portable SQLAlchemy Core: a change is an operator's
action and the version read is one index lookup, so no dialect override.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Connection, Table, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from throttler.constants import CLAIM_LOCK_KEY
from throttler.db import create_read_session_factory
from throttler.limits import Limit, LimitKey
from throttler.limits_in_force import Override
from throttler.models import LimitChange, LimitOverride
from throttler.waiting import parse_key

RULES = cast(Table, LimitOverride.__table__)
CHANGES = cast(Table, LimitChange.__table__)
VERSION = select(func.coalesce(func.max(CHANGES.c.id), 0))


class ChangeKind(StrEnum):
    SET = "set"
    DELETE = "delete"
    PAUSE = "pause"
    RESUME = "resume"


class ChangeReason(StrEnum):
    API = "api"  # an admin's request
    # An upstream push-back: a 429/503 with Retry-After, or a task raising
    # taskkit.Backpressure; ``by`` is the task id. It only extends a pause.
    UPSTREAM = "upstream"


class ChangeOutcome(StrEnum):
    CHANGED = "changed"
    NO_API_RULE = "no_api_rule"  # DELETE of a scope without a rule set through the API


@dataclass(frozen=True, kw_only=True, slots=True)
class ChangeAnswer:
    outcome: ChangeOutcome
    after: Override | None  # the scope's row after (None: no row)


@dataclass(frozen=True, kw_only=True, slots=True)
class Overrides:
    """Every ``limit_rules`` row, read at ``version``."""

    version: int
    rows: tuple[Override, ...]


def _override(row: Any) -> Override:
    limit = None
    if row.rate_per_s is not None or row.inflight is not None:
        limit = Limit(rate_per_s=row.rate_per_s, burst=row.burst or 1, inflight=row.inflight)
    return Override(key=parse_key(row.scope), limit=limit, paused_until=row.paused_until)


def _document(override: Override | None) -> dict[str, Any] | None:
    """A row as limit_changes.before/after hold it (JSON)."""
    if override is None:
        return None
    limit = override.limit
    return {
        "rate_per_s": None if limit is None else limit.rate_per_s,
        "burst": None if limit is None or limit.rate_per_s is None else limit.burst,
        "inflight": None if limit is None else limit.inflight,
        "paused_until": (
            None if override.paused_until is None else override.paused_until.isoformat()
        ),
    }


def _changed(
    kind: ChangeKind,
    before: Override | None,
    *,
    key: LimitKey,
    limit: Limit | None,
    paused_until: datetime | None,
    now: datetime,
    reason: ChangeReason = ChangeReason.API,
) -> Override | ChangeOutcome | None:
    """The row after ``kind``; None: no row; NO_API_RULE: refused."""
    kept_pause = before.paused_until if before is not None else None
    if kept_pause is not None and kept_pause <= now:
        kept_pause = None  # an expired pause is forgotten with the next change
    kept_limit = before.limit if before is not None else None
    if kind is ChangeKind.SET:
        return Override(key=key, limit=limit, paused_until=kept_pause)
    if kind is ChangeKind.DELETE:
        if kept_limit is None:
            return ChangeOutcome.NO_API_RULE
        return (
            None if kept_pause is None else Override(key=key, limit=None, paused_until=kept_pause)
        )
    if kind is ChangeKind.PAUSE:
        if (
            reason is ChangeReason.UPSTREAM
            and kept_pause is not None
            and (paused_until is None or kept_pause > paused_until)
        ):
            # An upstream push-back never shortens a pause (an admin's or a longer
            # Retry-After); an admin's pause is what they ask, shorter or longer.
            paused_until = kept_pause
        return Override(key=key, limit=kept_limit, paused_until=paused_until)
    # Resume: the row stays only for a rule it carries.
    return None if kept_limit is None else Override(key=key, limit=kept_limit, paused_until=None)


def change_limit(
    connection: Connection,
    kind: ChangeKind,
    *,
    key: LimitKey,
    by: str,
    now: datetime,
    limit: Limit | None = None,
    paused_until: datetime | None = None,
    reason: ChangeReason = ChangeReason.API,
) -> ChangeAnswer:
    """Apply one change to a scope's row and record it, in the caller's transaction."""
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))
    scope = str(key)
    found = connection.execute(select(RULES).where(RULES.c.scope == scope)).one_or_none()
    before = None if found is None else _override(found)
    after = _changed(
        kind, before, key=key, limit=limit, paused_until=paused_until, now=now, reason=reason
    )
    if isinstance(after, ChangeOutcome):
        return ChangeAnswer(outcome=after, after=before)
    if found is not None:
        connection.execute(RULES.delete().where(RULES.c.scope == scope))
    if after is not None:
        row_limit = after.limit
        connection.execute(
            RULES.insert().values(
                scope=scope,
                rate_per_s=None if row_limit is None else row_limit.rate_per_s,
                burst=(
                    None if row_limit is None or row_limit.rate_per_s is None else row_limit.burst
                ),
                inflight=None if row_limit is None else row_limit.inflight,
                paused_until=after.paused_until,
                updated_at=now,
                updated_by=by,
            )
        )
    connection.execute(
        CHANGES.insert().values(
            at=now,
            scope=scope,
            change=kind.value,
            before=_document(before),
            after=_document(after),
            reason=reason.value,
            by=by,
        )
    )
    return ChangeAnswer(outcome=ChangeOutcome.CHANGED, after=after)


def read_overrides(connection: Connection) -> Overrides:
    version = int(connection.execute(VERSION).scalar_one())
    rows = connection.execute(select(RULES).order_by(RULES.c.scope)).all()
    return Overrides(version=version, rows=tuple(_override(row) for row in rows))


class LimitStore:
    """Limit changes and reads, each call one transaction on a connection of ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        # Reads never wait behind writers (SQLite: BEGIN, not BEGIN IMMEDIATE).
        self._reads = create_read_session_factory(engine)

    async def version(self) -> int:
        """``max(limit_changes.id)``: moves with every change (0: none yet)."""
        async with self._reads() as session:
            return int(await session.scalar(VERSION) or 0)

    async def overrides(self) -> Overrides:
        async with self._reads() as session:
            return await session.run_sync(lambda sync: read_overrides(sync.connection()))

    async def change(
        self,
        kind: ChangeKind,
        *,
        key: LimitKey,
        by: str,
        now: datetime,
        limit: Limit | None = None,
        paused_until: datetime | None = None,
        reason: ChangeReason = ChangeReason.API,
    ) -> ChangeAnswer:
        def work(connection: Connection) -> ChangeAnswer:
            return change_limit(
                connection,
                kind,
                key=key,
                by=by,
                now=now,
                limit=limit,
                paused_until=paused_until,
                reason=reason,
            )

        async with self._engine.begin() as connection:
            return await connection.run_sync(work)
