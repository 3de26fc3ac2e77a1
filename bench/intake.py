"""``python -m bench.intake``: submissions per second against a bare FastAPI endpoint.

Starts ``python -m api`` (one uvicorn process) on a fresh SQLite file and the bare
baseline app (``bench.baseline``) with the same server settings, loads each for
``--duration-s`` with ``--connections`` concurrent keep-alive connections from this
process, and prints requests/s, p50 and p99 for both, their ratio, and bulk tasks/s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass

from bench.processes import free_port, http_server, migrate

GREETING = "/api/v1/task/greeting"
BULK = "/api/v1/tasks"
BULK_SIZE = 1000
WARMUP_S = 1.0
_CONTENT_LENGTH = re.compile(rb"content-length: *(\d+)", re.IGNORECASE)


@dataclass(frozen=True, kw_only=True, slots=True)
class Figures:
    requests: int
    elapsed_s: float
    p50_ms: float
    p99_ms: float

    @property
    def per_s(self) -> float:
        return self.requests / self.elapsed_s


def _request_bytes(port: int, path: str, body: object) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    return head.encode() + payload


async def _load(
    port: int, *, path: str, body: object, connections: int, duration_s: float
) -> Figures:
    """Post ``body`` over ``connections`` keep-alive connections; every answer must be 202.

    A minimal HTTP/1.1 client on raw streams: a general client (httpx) costs more CPU per
    request than the servers measured, and would make both sides look alike.
    """
    request = _request_bytes(port, path, body)
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
                if not head.startswith(b"HTTP/1.1 202"):
                    raise RuntimeError(f"{path}: {head[:12]!r} {answer[:200]!r}")
                if record:
                    latencies_s.append(time.monotonic() - started)
        finally:
            writer.close()
            await writer.wait_closed()

    warm_until = time.monotonic() + WARMUP_S
    await asyncio.gather(*(loop(warm_until, False) for _ in range(connections)))
    started = time.monotonic()
    until = started + duration_s
    await asyncio.gather(*(loop(until, True) for _ in range(connections)))
    elapsed_s = time.monotonic() - started
    cuts = statistics.quantiles(latencies_s, n=100)
    return Figures(
        requests=len(latencies_s),
        elapsed_s=elapsed_s,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
    )


def _print(label: str, figures: Figures) -> None:
    print(
        f"{label:<10} {figures.per_s:9.0f} req/s  p50 {figures.p50_ms:6.1f} ms  "
        f"p99 {figures.p99_ms:6.1f} ms  ({figures.requests} requests)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration-s", type=float, default=5.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    body = {"name": "bench"}
    with tempfile.TemporaryDirectory() as workdir:
        api_port, baseline_port = free_port(), free_port()
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/bench.db",
            "API_PORT": str(api_port),
            "API_KEYS": "",
        }
        migrate(env)
        with http_server(["bench.baseline", str(baseline_port)], env, baseline_port):
            baseline = asyncio.run(
                _load(
                    baseline_port,
                    path=GREETING,
                    body=body,
                    connections=args.connections,
                    duration_s=args.duration_s,
                )
            )
        with http_server(["api"], env, api_port):
            intake = asyncio.run(
                _load(
                    api_port,
                    path=GREETING,
                    body=body,
                    connections=args.connections,
                    duration_s=args.duration_s,
                )
            )
            bulk_body = {
                "tasks": [
                    {"name": "greeting", "input": {"name": f"n{i}"}} for i in range(BULK_SIZE)
                ]
            }
            bulk = asyncio.run(
                _load(
                    api_port, path=BULK, body=bulk_body, connections=4, duration_s=args.duration_s
                )
            )
    print(f"{args.connections} connections, {args.duration_s:.0f} s each, SQLite synchronous=FULL")
    _print("baseline", baseline)
    _print("intake", intake)
    print(f"ratio      {intake.per_s / baseline.per_s:.0%} of the bare endpoint")
    print(
        f"bulk       {bulk.per_s * BULK_SIZE:9.0f} tasks/s  ({BULK_SIZE} per request, "
        f"4 connections, p99 {bulk.p99_ms:.0f} ms)"
    )


if __name__ == "__main__":
    main()
