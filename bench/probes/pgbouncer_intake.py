"""``python -m bench.probes.pgbouncer_intake``: submissions per second through PgBouncer.

Issue 13, item 3. Three ``python -m api`` processes on one fresh PostgreSQL database
(``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL``) and a private Redis: connected directly;
directly with ``DATABASE_PGBOUNCER=true`` (the cost of the setting alone: every statement
prepared unnamed in its transaction, one more round trip each); and through a private
pgbouncer in transaction pooling mode (``--pool-size`` server connections) with the
setting. Each run loads the three in turn, as ``bench.intake`` does (one greeting per
request over ``--connections`` keep-alive connections, then bulk submissions of 1,000);
the figures are medians over ``--runs``. Then one transaction at a time on one engine of
each kind (two small reads each, ``--transactions`` per block, blocks alternated): the
round trips' own cost, without the API.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bench.intake import BULK, BULK_CONNECTIONS, BULK_SIZE, GREETING, Sizes, _api_env, _measure
from bench.processes import free_port, http_server, postgres_database
from devtools.pgbouncer import start_pgbouncer
from devtools.redis_server import start_redis_server
from throttler.db import create_engine
from throttler.models import Task
from throttler.settings import Settings

SETUPS = ("direct", "direct, DATABASE_PGBOUNCER=true", "via pgbouncer, DATABASE_PGBOUNCER=true")


async def _block_ms(engine: AsyncEngine, transactions: int) -> float:
    """Mean milliseconds of one two-statement transaction, run one after another."""
    count = select(func.count()).select_from(Task).where(Task.account == "bench")
    one = select(Task.id).where(Task.id == "none")
    started = time.perf_counter()
    for _ in range(transactions):
        async with engine.begin() as connection:
            await connection.execute(count)
            await connection.execute(one)
    return (time.perf_counter() - started) / transactions * 1000


async def _sequential(urls: tuple[str, ...], *, runs: int, transactions: int) -> dict[str, float]:
    engines = {
        setup: create_engine(
            Settings(database_url=url, database_pgbouncer="DATABASE_PGBOUNCER" in setup)
        )
        for setup, url in zip(SETUPS, urls, strict=True)
    }
    blocks: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    try:
        for engine in engines.values():
            await _block_ms(engine, 20)  # connect and warm up
        for _ in range(runs):
            for setup, engine in engines.items():
                blocks[setup].append(await _block_ms(engine, transactions))
    finally:
        for engine in engines.values():
            await engine.dispose()
    return {setup: statistics.median(values) for setup, values in blocks.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=10)
    parser.add_argument("--transactions", type=int, default=300)
    args = parser.parse_args()
    sizes = Sizes(duration_s=args.duration_s, warmup_s=0.5, runs=args.runs)
    single: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    p99: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    bulk: dict[str, list[float]] = {setup: [] for setup in SETUPS}
    greeting = {"name": "bench"}
    batch = {"tasks": [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(BULK_SIZE)]}
    with (
        tempfile.TemporaryDirectory() as workdir_name,
        postgres_database("bench_pgbouncer") as direct_url,
        contextlib.ExitStack() as servers,
    ):
        if direct_url is None:
            raise SystemExit("needs BENCH_POSTGRES_URL or TEST_POSTGRES_URL")
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        servers.callback(redis.stop)
        bouncer = start_pgbouncer(
            server_url=direct_url, workdir=workdir / "pgbouncer", pool_size=args.pool_size
        )
        servers.callback(bouncer.stop)
        urls = (direct_url, direct_url, bouncer.url(direct_url))
        ports = {}
        for setup, url in zip(SETUPS, urls, strict=True):
            port = free_port()
            env = _api_env(url, redis.url, port)
            if "DATABASE_PGBOUNCER" in setup:
                env["DATABASE_PGBOUNCER"] = "true"
            servers.enter_context(http_server(["api"], env, port))
            ports[setup] = port
        for _ in range(sizes.runs):
            for setup, port in ports.items():
                figures = _measure(
                    port, path=GREETING, body=greeting, connections=args.connections, sizes=sizes
                )
                single[setup].append(figures.per_s)
                p99[setup].append(figures.p99_ms)
                measured = _measure(
                    port, path=BULK, body=batch, connections=BULK_CONNECTIONS, sizes=sizes
                )
                bulk[setup].append(measured.per_s * BULK_SIZE)
        one_by_one = asyncio.run(
            _sequential(urls, runs=max(args.runs, 5), transactions=args.transactions)
        )
    print(
        f"median of {sizes.runs} runs, {args.connections} connections, "
        f"pgbouncer pool {args.pool_size}"
    )
    for setup in SETUPS:
        print(
            f"{setup:42s} single: {statistics.median(single[setup]):7.0f}/s "
            f"(p99 {statistics.median(p99[setup]):5.1f} ms)  "
            f"bulk: {statistics.median(bulk[setup]):8.0f} tasks/s  "
            f"runs: {[round(x) for x in single[setup]]}"
        )
    print("one transaction at a time (two reads), median ms per transaction:")
    for setup in SETUPS:
        print(f"{setup:42s} {one_by_one[setup]:6.2f} ms")


if __name__ == "__main__":
    main()
