"""PostgreSQL's fast paths for the outbox store: an advisory lock, a planner setting."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from sqlalchemy import ColumnElement, func, select, text

from throttler.constants import CLAIM_LOCK_KEY
from throttler.store.outbox import CoreClaim, CoreOutbox, RankedRow


class PostgresClaim(CoreClaim):
    """A claim under READ COMMITTED, beside other relays' claims."""

    async def serialize(self) -> None:
        # Claims that count in-flight tasks or queue room take turns until they commit.
        await self.session.execute(select(func.pg_advisory_xact_lock(CLAIM_LOCK_KEY)))

    async def _ranked(
        self, accounts: Sequence[str], *, limit: int, filters: Sequence[ColumnElement[bool]]
    ) -> list[RankedRow]:
        # PostgreSQL underestimates one account's pending tasks (account and status are
        # correlated), then reads them all by bitmap and sorts: 27 ms at 60,000 pending
        # against 0.06 ms for the ordered scan of the index that stops at the limit.
        await self.session.execute(text("SET LOCAL enable_bitmapscan = off"))
        ranked = await super()._ranked(accounts, limit=limit, filters=filters)
        await self.session.execute(text("SET LOCAL enable_bitmapscan = on"))
        return ranked


class PostgresOutbox(CoreOutbox):
    """The outbox store on PostgreSQL."""

    claim_type: ClassVar[type[CoreClaim]] = PostgresClaim

    async def surely_idle(self) -> bool:
        # A claim that finds nothing holds no lock anyone waits for: claim and see,
        # rather than pay a look before every claim.
        return False
