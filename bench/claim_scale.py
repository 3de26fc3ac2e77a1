"""``python -m bench.claim_scale``: the relay's claim at 1,000,000 pending tasks, 10,000 accounts.

A backlog of pending tasks (with their outbox rows) spread evenly over the accounts is
generated inside the database (a recursive CTE on SQLite, ``generate_series`` on
PostgreSQL; secondary indexes dropped and built again, then ``ANALYZE``), on a fresh
SQLite file and, when ``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL`` is set, a throwaway
PostgreSQL database. Then, in this process, a real ``relay.relay.Relay`` (the store,
limiter and ARQ pool ``python -m relay`` builds, a private Redis) is driven the way
``python -m relay`` drives it:

- the claim: ``Relay.claim()`` (one transaction: select each account's next tasks in
  turn, admit, lease a batch of ``RELAY_BATCH_SIZE=1000``), timed one after another;
  its rows are leased for an hour, so each claim takes the next 1,000;
- the release rate: ``Relay.run()`` (claim, enqueue into ARQ, delete the rows), the
  tasks that reached ARQ's queue per second over a few batches, after its first;

each with no limits and with ``account:*`` limits (``ACCOUNT_LIMITS``: a rate, so the
Redis limiter is asked for every task, and an in-flight cap, so the claim takes the
advisory lock / write lock and counts in-flight tasks per account), generous enough that
no account reaches them: what is measured is their cost. The backlog shrinks by what
each measurement releases (a few percent). For comparison the same is measured with the
backlog spread over ``FEW_ACCOUNTS`` accounts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from arq.connections import ArqRedis, RedisSettings, create_pool
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bench.figures import Figure, Target, render
from bench.processes import migrate, postgres_database
from bench.rows import unindexed_sqlite
from devtools.redis_server import start_redis_server
from relay.relay import Relay
from throttler.db import create_engine
from throttler.dispatches import last_dispatch_from
from throttler.limits import RuleSet
from throttler.settings import Settings
from throttler.store import open_store
from throttler.throttle import Limiter, build_limiter

QUEUE = "arq:queue"
# Every account limited, above what a measurement takes of any account (at most about
# 800 tasks each, with the fewest accounts).
ACCOUNT_LIMITS = "account:* rate=1000/s burst=1000 inflight=10000"
INFORMATION = Target()
# A claim of 1,000 tasks well under a second even at 10,000 accounts.
CLAIM_TARGET = Target(at_most=1000)


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    tasks: int
    accounts: int
    few_accounts: int
    claims: int  # timed, after one untimed
    release_batches: int  # timed, after the first reached ARQ
    batch: int = 1000  # RELAY_BATCH_SIZE


QUICK = Sizes(tasks=2_000, accounts=10, few_accounts=2, claims=1, release_batches=1, batch=100)
FULL = Sizes(tasks=1_000_000, accounts=10_000, few_accounts=10, claims=1, release_batches=1)
# How long the release measurement waits for a batch to reach ARQ: past it the rate is
# what reached ARQ in that time (0 when nothing did, which the row says).
RELEASE_TIMEOUT_S = 240.0

_SQLITE_BACKLOG = """
WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < :count - 1)
INSERT INTO tasks (id, name, account, payload, status, priority, attempts, created_at)
SELECT printf('%08x-0000-7000-8000-%012x', :first_us / 1000000, i), 'greeting',
       'account-' || (i % :accounts), '{"name": "n' || i || '"}', 'pending', 5, 0,
       strftime('%Y-%m-%d %H:%M:%S', (:first_us + i) / 1000000, 'unixepoch')
       || '.' || printf('%06d', (:first_us + i) % 1000000)
FROM n
"""
_POSTGRES_BACKLOG = """
INSERT INTO tasks (id, name, account, payload, status, priority, attempts, created_at)
SELECT lpad(to_hex(CAST(:first_us AS bigint) / 1000000), 8, '0') || '-0000-7000-8000-'
       || lpad(to_hex(i), 12, '0'), 'greeting', 'account-' || (i % :accounts),
       CAST('{"name": "n' || i || '"}' AS jsonb), 'pending', 5, 0,
       TIMESTAMPTZ '1970-01-01 00:00:00+00'
       + (CAST(:first_us AS bigint) + i) * INTERVAL '1 microsecond'
FROM generate_series(CAST(0 AS bigint), CAST(:count AS bigint) - 1) AS i
"""
# The outbox in submission order (its id is the claim's last tie-break).
_OUTBOX = "INSERT INTO outbox (task_id, created_at) SELECT id, created_at FROM tasks ORDER BY id"


def _parameters(sizes: Sizes, accounts: int) -> dict[str, int]:
    now = datetime.now(UTC)
    first_us = int(now.timestamp()) * 1_000_000 - sizes.tasks
    return {"count": sizes.tasks, "accounts": accounts, "first_us": first_us}


def fill_sqlite(path: Path, sizes: Sizes, *, accounts: int) -> None:
    with unindexed_sqlite(path, ("tasks", "outbox")) as connection:
        connection.execute("DELETE FROM outbox")
        connection.execute("DELETE FROM tasks")
        connection.execute(_SQLITE_BACKLOG, _parameters(sizes, accounts))
        connection.execute(_OUTBOX)
        connection.execute("ANALYZE")


async def fill_postgres(url: str, sizes: Sizes, *, accounts: int) -> None:
    engine = create_async_engine(url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text("SET LOCAL maintenance_work_mem = '256MB'"))
            await connection.execute(text("TRUNCATE tasks CASCADE"))
            # Every index but the constraints' (primary keys, unique task_id), built again.
            indexes = (
                await connection.execute(
                    text(
                        "SELECT indexname, indexdef FROM pg_indexes "
                        "WHERE tablename IN ('tasks', 'outbox') "
                        "AND indexname NOT IN (SELECT conname FROM pg_constraint)"
                    )
                )
            ).all()
            for name, _ in indexes:
                await connection.execute(text(f'DROP INDEX "{name}"'))
            await connection.execute(text(_POSTGRES_BACKLOG), _parameters(sizes, accounts))
            await connection.execute(text(_OUTBOX))
            for _, definition in indexes:
                await connection.execute(text(definition))
        async with engine.connect() as connection:
            await connection.execution_options(isolation_level="AUTOCOMMIT")
            await connection.execute(text("VACUUM ANALYZE tasks"))
            await connection.execute(text("VACUUM ANALYZE outbox"))
    finally:
        await engine.dispose()


@dataclass(frozen=True, kw_only=True, slots=True)
class Measured:
    claim_ms: float  # median over the timed claims
    claimed: int  # tasks per claim (the last)
    released_per_s: float


async def measure(database_url: str, redis_url: str, *, limits: str, sizes: Sizes) -> Measured:
    """Time ``sizes.claims`` claims, then ``sizes.release_batches`` batches released."""
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        relay_rate=0,
        relay_limits=limits,
        relay_max_inflight=0,
        relay_batch_size=sizes.batch,
        relay_claim_lease_s=3600,
        log_level="WARNING",
    )
    engine = create_engine(settings)
    arq = await create_pool(RedisSettings.from_dsn(redis_url), default_queue_name=QUEUE)
    try:
        await arq.flushall()
        store = open_store(settings, engine)
        recovery = store.recovery

        def limiter_for(rules: RuleSet) -> Limiter:
            return build_limiter(redis=arq, rules=rules, last_dispatch=last_dispatch_from(recovery))

        relay = Relay(
            settings=settings,
            outbox=store.outbox,
            arq=arq,
            limiter=limiter_for(settings.limit_rules),
            limiter_for=limiter_for,
        )
        claim_s: list[float] = []
        claimed = 0
        for index in range(sizes.claims + 1):
            started = time.perf_counter()
            batch = await relay.claim()
            if index:  # the first also loads the limits and warms the caches
                claim_s.append(time.perf_counter() - started)
            claimed = len(batch.to_enqueue)
            if claimed != sizes.batch:
                raise RuntimeError(f"a claim leased {claimed} tasks, not {sizes.batch}")
        # Releasing: a fresh relay (the leased rows above stay leased to the first).
        releasing = Relay(
            settings=settings,
            outbox=store.outbox,
            arq=arq,
            limiter=limiter_for(settings.limit_rules),
            limiter_for=limiter_for,
        )
        began = time.perf_counter()
        running = asyncio.create_task(releasing.run())
        try:
            # Timed from the first batch in ARQ's queue (the relay's start is not); when
            # none comes in time, from the start.
            deadline = time.monotonic() + RELEASE_TIMEOUT_S
            first, started = await _queued_at_least(arq, 1, running, deadline=deadline)
            if not first:
                started = began
            target = first + sizes.release_batches * sizes.batch
            deadline = time.monotonic() + RELEASE_TIMEOUT_S
            last, finished = await _queued_at_least(arq, target, running, deadline=deadline)
        finally:
            releasing.stop()
            await running
        return Measured(
            claim_ms=statistics.median(claim_s) * 1000,
            claimed=claimed,
            released_per_s=(last - first) / (finished - started),
        )
    finally:
        await arq.aclose()
        await engine.dispose()


async def _queued_at_least(
    arq: ArqRedis, count: int, running: asyncio.Task[None], *, deadline: float
) -> tuple[int, float]:
    """Wait until ARQ's queue holds ``count`` jobs, or until ``deadline`` (monotonic);
    how many it held then, and when (perf_counter)."""
    while True:
        queued = await arq.zcard(QUEUE)
        if queued >= count or time.monotonic() > deadline:
            return queued, time.perf_counter()
        if running.done():
            running.result()
            raise RuntimeError("the relay stopped")
        await asyncio.sleep(0.005)


def _progress(database: str, accounts: int, limits: str, measured: Measured) -> None:
    print(
        f"# claim_scale {database}, {accounts} accounts, limits {limits or '-'}: claim "
        f"{measured.claim_ms:,.0f} ms, release {measured.released_per_s:,.0f}/s",
        file=sys.stderr,
        flush=True,
    )


def _measure_both(
    database: str, accounts: int, url: str, redis_url: str, sizes: Sizes
) -> dict[str, Measured]:
    # With limits first, on a backlog nothing was dispatched from: a rate limiter that
    # finds no buckets in Redis after recent dispatches (Redis restarted, as far as it can
    # tell) holds back until the drain floor has passed (README: "Rate limits across a
    # Redis restart"), which the measurement would count.
    account = asyncio.run(measure(url, redis_url, limits=ACCOUNT_LIMITS, sizes=sizes))
    return {
        "account": account,
        "none": asyncio.run(measure(url, redis_url, limits="", sizes=sizes)),
    }


def measure_all(
    sizes: Sizes, *, databases: tuple[str, ...] = ("sqlite", "postgres")
) -> dict[tuple[str, int], dict[str, Measured]]:
    """(database, accounts) -> limits ("none", "account") -> what was measured."""
    results: dict[tuple[str, int], dict[str, Measured]] = {}
    with tempfile.TemporaryDirectory() as workdir_name, ExitStack() as stack:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        stack.callback(redis.stop)
        database = workdir / "backlog.db"
        sqlite_url = f"sqlite+aiosqlite:///{database}"
        migrate({**os.environ, "DATABASE_URL": sqlite_url})
        postgres_url = None
        if "postgres" in databases:
            postgres_url = stack.enter_context(postgres_database("bench_claim_scale"))
        for accounts in (sizes.accounts, sizes.few_accounts):
            if "sqlite" in databases:
                fill_sqlite(database, sizes, accounts=accounts)
                results[("SQLite", accounts)] = _measure_both(
                    "SQLite", accounts, sqlite_url, redis.url, sizes
                )
            if postgres_url is not None:
                asyncio.run(fill_postgres(postgres_url, sizes, accounts=accounts))
                results[("PostgreSQL", accounts)] = _measure_both(
                    "PostgreSQL", accounts, postgres_url, redis.url, sizes
                )
    return results


def figures_of(results: dict[tuple[str, int], dict[str, Measured]], sizes: Sizes) -> list[Figure]:
    figures: list[Figure] = []
    pending = f"{sizes.tasks:,} pending"
    for (database, accounts), measured in results.items():
        if accounts != sizes.accounts:
            continue
        few = results.get((database, sizes.few_accounts))
        for limits, label in (("none", "no limits"), ("account", "account:* limits")):
            figures += [
                Figure(
                    name=f"Claim of a batch, {database}, {label}",
                    value=measured[limits].claim_ms,
                    unit="ms",
                    target=CLAIM_TARGET,
                    baseline=few[limits].claim_ms if few else None,
                    baseline_name=f"{sizes.few_accounts} accounts",
                    note=f"{sizes.batch:,} tasks, {pending} over {accounts:,} accounts, "
                    f"median of {sizes.claims}",
                ),
                Figure(
                    name=f"Relay release, {database}, {label}",
                    value=measured[limits].released_per_s,
                    unit="tasks/s",
                    target=INFORMATION,
                    baseline=few[limits].released_per_s if few else None,
                    baseline_name=f"{sizes.few_accounts} accounts",
                    note=f"{pending} over {accounts:,} accounts, {sizes.release_batches} batches",
                ),
            ]
    return figures


def run(*, quick: bool) -> list[Figure]:
    """Measure the claim at scale (``make bench`` calls this)."""
    sizes = QUICK if quick else FULL
    results = measure_all(sizes)
    return [*figures_of(results, sizes), memory_figure(sizes)]


def memory_figure(sizes: Sizes) -> Figure:
    """This process's peak RSS: the relays' claims, which hold what they read."""
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Figure(
        name="Relay memory at scale",
        value=peak_mb,
        unit="MB",
        target=INFORMATION,
        note=f"peak RSS of the process running the relays, {sizes.tasks:,} pending over "
        f"{sizes.accounts:,} accounts",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--tasks", type=int, default=FULL.tasks)
    parser.add_argument("--accounts", type=int, default=FULL.accounts)
    parser.add_argument(
        "--database", action="append", choices=("sqlite", "postgres"), help="only these"
    )
    args = parser.parse_args()
    sizes = (
        QUICK
        if args.quick
        else Sizes(
            tasks=args.tasks,
            accounts=args.accounts,
            few_accounts=FULL.few_accounts,
            claims=FULL.claims,
            release_batches=FULL.release_batches,
        )
    )
    results = measure_all(sizes, databases=tuple(args.database or ("sqlite", "postgres")))
    for (database, accounts), measured in results.items():
        for limits, figures in measured.items():
            print(
                f"{database:<10} {accounts:>6} accounts, limits {limits:<7}: "
                f"claim {figures.claim_ms:.1f} ms, release {figures.released_per_s:,.0f}/s"
            )
    print(render([*figures_of(results, sizes), memory_figure(sizes)]))


if __name__ == "__main__":
    main()
