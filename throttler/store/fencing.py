"""How long a vanished client's transaction may hold its locks (PostgreSQL).

A relay, worker or reconciler cut off from PostgreSQL in the middle of a transaction
leaves that transaction open on the server: nothing tells PostgreSQL the client is gone
until TCP gives up on it (hours, with the kernel's default keepalive), and meanwhile its
locks stay. A relay's claim holds the claims' advisory lock, so every other relay's
claim waits for a relay that may never come back; a worker's batch holds its tasks' rows,
so no other worker can start (or take over) those tasks. The partition test
(tests/acceptance/test_partition.py) showed both.

So each of these transactions first sets ``idle_in_transaction_session_timeout`` for
itself (``set_config(..., is_local => true)``: the transaction's own, never the
session's, which PgBouncer's transaction pooling would hand to another client): once the
client has sent nothing for that long, PostgreSQL ends the session and its transaction,
releasing the locks, and nothing of it commits. A live client never idles that long
inside these transactions (its statements follow each other, with at most a Redis round
trip between them), and a client killed by mistake only retries. The timeout is
``DATABASE_TIMEOUT_S``: a waiter's statement gives up after twice that, so a lock held
by a vanished client is released before the others give up waiting for it.

SQLite needs none of this: one host, and a writer that dies releases its lock at once.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, func, select, true

IDLE_SETTING = "idle_in_transaction_session_timeout"
# Planner settings for a transaction whose statements name their rows by primary key (a
# batch of ids): PostgreSQL's cost model otherwise prices a scan of a table of some
# thousands of rows, or a status index, below that many look-ups by key, then passes
# every row through the id list, for each statement.
BY_KEY_ONLY = {"enable_seqscan": "off", "enable_bitmapscan": "off"}


def idle_limit(timeout_s: float, **planner: str) -> Select[Any]:
    """The statement that ends this transaction's session after ``timeout_s`` idle.

    ``planner``: further settings for the transaction alone (``enable_seqscan="off"``),
    set by the same statement, so they cost no round trip of their own.
    """
    limit = f"{max(1, round(timeout_s * 1000))}ms"
    return select(
        func.set_config(IDLE_SETTING, limit, true()),
        *(func.set_config(name, value, true()) for name, value in planner.items()),
    )
