"""``python -m bench.intake``: submissions per second against the seed's design.

Starts, one uvicorn process each with the same server settings, the bare baseline app
(``bench.baseline``: validates and answers, writing nothing), the seed's design
(``bench.seed_design``: validates and enqueues straight into ARQ, no database) and
``python -m api`` on a fresh SQLite file, and on PostgreSQL when ``BENCH_POSTGRES_URL`` or
``TEST_POSTGRES_URL`` is set, all with a private Redis. Each run loads the bare endpoint,
the seed's design, then the API, with ``connections`` keep-alive connections posting one
greeting each time, then bulk submissions of 1,000 greetings. Figures are medians over the
runs; the baselines are measured in every run, just before the API, since the machine is
noisy. Durable submission is judged against the seed's design (as fast, while durable);
the ratio to the bare endpoint is shown for information. The load comes from this process,
a separate one from every server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.figures import Figure, Target, median, render
from bench.processes import free_port, http_server, migrate, postgres_database
from devtools.redis_server import start_redis_server

GREETING = "/api/v1/task/greeting"
BULK = "/api/v1/tasks"
BULK_SIZE = 1000
BULK_CONNECTIONS = 4
BARE_NAME = "bare FastAPI endpoint"
SEED_NAME = "seed design: FastAPI + enqueue_job, no database"
# Durable submission at least the rate of the design it replaced (issue 8).
SUBMIT_TARGET = Target(at_least=1.0, of_baseline=True)
INFORMATION = Target()
P99_TARGET = Target(at_most=50)
BULK_TARGET = Target(at_least=20_000)
# A replay (read the key's task, answer its view) at least 0.9x a plain submit's rate.
REPLAY_TARGET = Target(at_least=0.9, of_baseline=True)
_CONTENT_LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    duration_s: float  # of each measured load
    warmup_s: float  # before each, unmeasured
    runs: int


QUICK = Sizes(duration_s=0.5, warmup_s=0.2, runs=1)
FULL = Sizes(duration_s=3.0, warmup_s=0.5, runs=3)


@dataclass(frozen=True, kw_only=True, slots=True)
class Figures:
    requests: int
    elapsed_s: float
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        return self.requests / self.elapsed_s


def _request_bytes(port: int, path: str, body: object, extra_head: str = "") -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra_head}"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _load(
    port: int,
    *,
    path: str,
    body: object,
    connections: int,
    duration_s: float,
    warmup_s: float = 1.0,
    extra_head: str = "",
    expect: tuple[bytes, ...] = (b"HTTP/1.1 202",),
) -> Figures:
    """Post ``body`` over ``connections`` keep-alive connections; every answer must be
    one of ``expect`` (a 202, unless told).

    A minimal HTTP/1.1 client on raw streams: a general client (httpx) costs more CPU per
    request than the servers measured, and would make both sides look alike.
    """
    request = _request_bytes(port, path, body, extra_head)
    latencies_s: list[float] = []

    async def loop(until: float, record: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while time.monotonic() < until:
                started = time.monotonic()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                length = _CONTENT_LENGTH.search(head)
                answer = await reader.readexactly(int(length.group(1)) if length else 0)
                if not head.startswith(expect):
                    raise RuntimeError(f"{path}: {head[:12]!r} {answer[:200]!r}")
                if record:
                    latencies_s.append(time.monotonic() - started)
        finally:
            writer.close()
            await writer.wait_closed()

    warm_until = time.monotonic() + warmup_s
    await asyncio.gather(*(loop(warm_until, False) for _ in range(connections)))
    started = time.monotonic()
    until = started + duration_s
    await asyncio.gather(*(loop(until, True) for _ in range(connections)))
    elapsed_s = time.monotonic() - started
    cuts = statistics.quantiles(latencies_s, n=100) if len(latencies_s) > 1 else [0.0] * 99
    return Figures(
        requests=len(latencies_s),
        elapsed_s=elapsed_s,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
    )


def _measure(
    port: int,
    *,
    path: str,
    body: object,
    connections: int,
    sizes: Sizes,
    extra_head: str = "",
    expect: tuple[bytes, ...] = (b"HTTP/1.1 202",),
) -> Figures:
    # uvloop: the load generator's own CPU is taken from the 2 cores the servers share.
    return uvloop.run(
        _load(
            port,
            path=path,
            body=body,
            connections=connections,
            duration_s=sizes.duration_s,
            warmup_s=sizes.warmup_s,
            extra_head=extra_head,
            expect=expect,
        )
    )


def _api_env(database_url: str, redis_url: str, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "API_KEYS": "",
    }


@dataclass(kw_only=True, slots=True)
class _Series:
    per_s: list[float]
    p99_ms: list[float]

    @classmethod
    def empty(cls) -> _Series:
        return cls(per_s=[], p99_ms=[])

    def add(self, figures: Figures, *, items_per_request: int = 1) -> None:
        self.per_s.append(figures.per_s * items_per_request)
        self.p99_ms.append(figures.p99_ms)


def measure_all(*, sizes: Sizes, connections: int) -> dict[str, _Series]:
    """Run every load ``sizes.runs`` times; keys: bare, seed, sqlite, postgres, replay,
    replay_postgres, bulk."""
    names = ("bare", "seed", "sqlite", "postgres", "replay", "replay_postgres", "bulk")
    series = {name: _Series.empty() for name in names}
    greeting = {"name": "bench"}
    bulk = {"tasks": [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(BULK_SIZE)]}
    with (
        tempfile.TemporaryDirectory() as workdir_name,
        postgres_database("bench_intake") as postgres_url,
        contextlib.ExitStack() as servers,
    ):
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        servers.callback(redis.stop)
        sqlite_url = f"sqlite+aiosqlite:///{workdir}/bench.db"
        migrate({**os.environ, "DATABASE_URL": sqlite_url})
        bare_port, seed_port = free_port(), free_port()
        sqlite_port, postgres_port = free_port(), free_port()
        env = _api_env(sqlite_url, redis.url, sqlite_port)
        servers.enter_context(http_server(["bench.baseline", str(bare_port)], env, bare_port))
        servers.enter_context(
            http_server(["bench.seed_design", str(seed_port), redis.url], env, seed_port)
        )
        servers.enter_context(http_server(["api"], env, sqlite_port))
        loads = [("bare", bare_port), ("seed", seed_port), ("sqlite", sqlite_port)]
        if postgres_url is not None:
            pg_env = _api_env(postgres_url, redis.url, postgres_port)
            servers.enter_context(http_server(["api"], pg_env, postgres_port))
            loads.append(("postgres", postgres_port))
        for _ in range(sizes.runs):
            # The baselines just before the API, in every run: the machine is noisy.
            for key, port in loads:
                series[key].add(
                    _measure(
                        port, path=GREETING, body=greeting, connections=connections, sizes=sizes
                    )
                )
            # Every request under one key: the warm-up's first creates the task (202), every
            # other answers the 200 replay.
            key = f"Idempotency-Key: bench-replay-{len(series['replay'].per_s)}\r\n"
            replays = [("replay", sqlite_port)]
            if postgres_url is not None:
                replays.append(("replay_postgres", postgres_port))
            for name, port in replays:
                series[name].add(
                    _measure(
                        port,
                        path=GREETING,
                        body=greeting,
                        connections=connections,
                        sizes=sizes,
                        extra_head=key,
                        expect=(b"HTTP/1.1 200", b"HTTP/1.1 202"),
                    )
                )
            measured = _measure(
                sqlite_port, path=BULK, body=bulk, connections=BULK_CONNECTIONS, sizes=sizes
            )
            series["bulk"].add(measured, items_per_request=BULK_SIZE)
    return series


def figures_of(series: dict[str, _Series], *, sizes: Sizes, connections: int) -> list[Figure]:
    runs = f"median of {sizes.runs}"
    bare = median(series["bare"].per_s)
    seed = median(series["seed"].per_s)
    figures: list[Figure] = []
    for key, label in (("sqlite", "SQLite"), ("postgres", "PostgreSQL")):
        if not series[key].per_s:
            continue
        rate = median(series[key].per_s)
        figures += [
            Figure(
                name=f"Submit, {label}",
                value=rate,
                unit="req/s",
                target=SUBMIT_TARGET,
                baseline=seed,
                baseline_name=SEED_NAME,
                note=f"{connections} connections, each 202 committed, {runs}",
            ),
            Figure(
                name=f"Submit, {label}, against a bare endpoint",
                value=rate,
                unit="req/s",
                target=INFORMATION,
                baseline=bare,
                baseline_name=BARE_NAME,
                note="the same runs; the ceiling of one uvicorn process writing nothing",
            ),
            Figure(
                name=f"Submit p99, {label}",
                value=median(series[key].p99_ms),
                unit="ms",
                target=P99_TARGET,
                note=f"{connections} connections, {runs}",
            ),
        ]
    for replay, plain, label in (
        ("replay", "sqlite", "SQLite"),
        ("replay_postgres", "postgres", "PostgreSQL"),
    ):
        if series[replay].per_s and series[plain].per_s:
            figures.append(
                Figure(
                    name=f"Idempotent replay, {label}",
                    value=median(series[replay].per_s),
                    unit="req/s",
                    target=REPLAY_TARGET,
                    baseline=median(series[plain].per_s),
                    baseline_name=f"plain submit, {label}",
                    note=f"{connections} connections, one key, each a 200 replay, {runs}",
                )
            )
    figures.append(
        Figure(
            name="Bulk, SQLite",
            value=median(series["bulk"].per_s),
            unit="tasks/s",
            target=BULK_TARGET,
            note=f"{BULK_SIZE} per request, {BULK_CONNECTIONS} connections, {runs}",
        )
    )
    return figures


def run(*, quick: bool, connections: int = 32) -> list[Figure]:
    """Measure submission and bulk submission (``make bench`` calls this)."""
    sizes = QUICK if quick else FULL
    series = measure_all(sizes=sizes, connections=connections)
    return figures_of(series, sizes=sizes, connections=connections)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=FULL.duration_s)
    parser.add_argument("--runs", type=int, default=FULL.runs)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one run")
    args = parser.parse_args()
    sizes = (
        QUICK
        if args.quick
        else Sizes(duration_s=args.duration_s, warmup_s=FULL.warmup_s, runs=args.runs)
    )
    series = measure_all(sizes=sizes, connections=args.connections)
    for key, values in series.items():
        if values.per_s:
            rates = ", ".join(f"{value:,.0f}" for value in values.per_s)
            p99s = ", ".join(f"{value:.1f}" for value in values.p99_ms)
            print(f"{key:<9} per s: {rates}; p99 ms: {p99s}")
    print(render(figures_of(series, sizes=sizes, connections=args.connections)))


if __name__ == "__main__":
    main()
