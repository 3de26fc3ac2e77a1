"""SQLite's fast paths for the outbox store: one writer at a time, and an index hint."""

from __future__ import annotations

from typing import ClassVar

from throttler.store.outbox import CoreClaim, CoreOutbox


class SqliteClaim(CoreClaim):
    """A claim in a ``BEGIN IMMEDIATE`` transaction: it already holds the write lock."""

    # Nobody else writes until this transaction commits, so the rows read in rank order
    # are the claim: no second statement to lock them.
    reads_are_locks: ClassVar[bool] = True
    # Without ANALYZE statistics SQLite picks the (status, ...) indexes for the equality on
    # status and sorts every pending task instead of seeking one account at a time.
    accounts_hint: ClassVar[str] = "INDEXED BY ix_tasks_pending_turn"


class SqliteOutbox(CoreOutbox):
    """The outbox store on SQLite (claims serialize on the database's write lock)."""

    claim_type: ClassVar[type[CoreClaim]] = SqliteClaim
