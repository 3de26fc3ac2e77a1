"""``python -m bench.probes.pgbouncer_intake``: submissions per second through PgBouncer.

Issue 13, item 3. Three ``python -m api`` processes on one fresh PostgreSQL database
(``BENCH_POSTGRES_URL`` or ``TEST_POSTGRES_URL``) and a private Redis: connected directly;
directly with ``DATABASE_PGBOUNCER=true`` (the cost of the setting alone: every statement
prepared unnamed in its transaction, one more round trip each); and through a private
pgbouncer in transaction pooling mode (``--pool-size`` server connections) with the
setting. Each run loads the three in turn, as ``bench.intake`` does (one greeting per
request over ``--connections`` keep-alive connections, then bulk submissions of 1,000);
the figures are medians over ``--runs``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
from pathlib import Path

from bench.intake import BULK, BULK_CONNECTIONS, BULK_SIZE, GREETING, Sizes, _api_env, _measure
from bench.processes import free_port, http_server, postgres_database
from devtools.pgbouncer import start_pgbouncer
from devtools.redis_server import start_redis_server

SETUPS = ("direct", "direct, DATABASE_PGBOUNCER=true", "via pgbouncer, DATABASE_PGBOUNCER=true")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration-s", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--pool-size", type=int, default=10)
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


if __name__ == "__main__":
    main()
