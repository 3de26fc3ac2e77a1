"""``python -m bench.upstream``: an upstream 429 with Retry-After: 2 on one host of ten (issue 11).

Ten local HTTP servers, one per host key (127.0.0.1 to 127.0.0.10: loopback answers the
whole 127/8, and each address is its own ``host:`` key), each recording when it was asked.
A backlog of downloads spread over the ten, ``RELAY_LIMITS="host:* rate=20/s"``, one
``python -m relay`` and one ``python -m worker`` on a fresh SQLite file. Two seconds after
its first request, host 1 answers one request with ``429 Retry-After: 2`` (every other
answer is 200).

Figures: the time from that 429 to host 1's next request (target ≥ 2 s), and the slowest
of the nine other hosts' request rates from the 429 to 2 s after it (within 3 % of
20/s). The gap is taken on the servers' own clock, as the upstream sees it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.figures import Figure, Target, render
from bench.processes import free_port, migrate, module_process, stack_env
from bench.relay import relay_process
from bench.rows import connect, sqlite_time
from devtools.redis_server import start_redis_server

HOSTS = 10
RATE = 20  # per host, per second
RETRY_AFTER_S = 2
PUSH_BACK_AFTER_S = 2.0  # host 1 answers 429 to its first request this long after start
BODY = b"ok\n"
POLL_S = 0.02


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    after_s: float  # how long to watch after the 429


QUICK = Sizes(after_s=2.5)
FULL = Sizes(after_s=5.0)


@dataclass
class Upstream:
    """One host's server: when it was asked, and when it answered 429 (at most once)."""

    pushes_back: bool  # answers 429 once, PUSH_BACK_AFTER_S after its first request
    times: list[float] = field(default_factory=list)
    refused_at: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: Upstream) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            now = time.time()
            with state.lock:
                state.times.append(now)
                refuse = (
                    state.pushes_back
                    and state.refused_at is None
                    and now >= state.times[0] + PUSH_BACK_AFTER_S
                )
                if refuse:
                    state.refused_at = now
            if refuse:
                self.send_response(429)
                self.send_header("Retry-After", str(RETRY_AFTER_S))
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    return Handler


@contextmanager
def _servers(port: int) -> Iterator[list[Upstream]]:
    states = [Upstream(pushes_back=i == 0) for i in range(HOSTS)]
    servers = [
        ThreadingHTTPServer((f"127.0.0.{i + 1}", port), _handler(state))
        for i, state in enumerate(states)
    ]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for thread in threads:
        thread.start()
    try:
        yield states
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _fill(database: Path, *, port: int, per_host: int) -> None:
    """Pending downloads, round-robin over the hosts, as the API would store them."""
    start = datetime.now(UTC)
    rows = []
    for index in range(per_host * HOSTS):
        host = f"127.0.0.{index % HOSTS + 1}"
        at = sqlite_time(start + timedelta(microseconds=index))
        payload = json.dumps({"url": f"http://{host}:{port}/f{index}"})
        rows.append((str(uuid.uuid4()), payload, host, at))
    connection = connect(database)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO tasks (id, name, account, payload, host, status, priority, attempts, "
            "created_at) VALUES (?, 'download', 'default', ?, ?, 'pending', 5, 0, ?)",
            rows,
        )
        connection.executemany(
            "INSERT INTO outbox (task_id, created_at) VALUES (?, ?)",
            [(row[0], row[3]) for row in rows],
        )
        connection.execute("COMMIT")
    finally:
        connection.close()


def _rate(times: list[float], start: float, end: float) -> float:
    inside = sorted(t for t in times if start <= t <= end)
    return (len(inside) - 1) / (inside[-1] - inside[0]) if len(inside) > 1 else 0.0


def _one_run(workdir: Path, sizes: Sizes) -> list[Figure]:
    redis = start_redis_server(workdir=workdir / "redis")
    database = workdir / "upstream.db"
    port = free_port()
    env = stack_env(
        database=database,
        redis_url=redis.url,
        port=free_port(),
        LOG_LEVEL="INFO",
        RELAY_LIMITS=f"host:* rate={RATE}/s",
        DOWNLOAD_ALLOW_PRIVATE="true",
    )
    try:
        migrate(env)
        per_host = round(RATE * (PUSH_BACK_AFTER_S + sizes.after_s + 3.0))
        _fill(database, port=port, per_host=per_host)
        with _servers(port) as states, ExitStack() as stack:
            worker_log = stack.enter_context((workdir / "worker.log").open("wb"))
            stack.enter_context(module_process(["worker"], env, output=worker_log))
            stack.enter_context(relay_process(env, log_path=workdir / "relay.log"))
            refused = states[0]
            deadline = time.time() + PUSH_BACK_AFTER_S + 60.0
            while refused.refused_at is None and time.time() < deadline:
                time.sleep(POLL_S)
            if refused.refused_at is None:
                raise RuntimeError("host 1 was never asked after the push-back moment")
            at = refused.refused_at
            while time.time() < at + sizes.after_s:
                time.sleep(POLL_S)
            with refused.lock:
                later = [t for t in refused.times if t > at]
            others = [_rate(list(s.times), at, at + RETRY_AFTER_S) for s in states[1:]]
    finally:
        redis.stop()
    gap = (min(later) - at) if later else sizes.after_s
    slowest = min(others)
    return [
        Figure(
            name=f"429ing host: time to its next request (Retry-After: {RETRY_AFTER_S})",
            value=gap,
            unit="s",
            target=Target(at_least=RETRY_AFTER_S),
            note=f"1 host of {HOSTS}, host:* rate={RATE}/s; one relay, one worker (processes); "
            f"{len([t for t in later if t < at + RETRY_AFTER_S])} requests inside the pause",
        ),
        Figure(
            name="Slowest other host's rate during the pause",
            value=slowest,
            unit="requests/s",
            target=Target(at_least=0.97, at_most=1.03, of_baseline=True),
            baseline=RATE,
            baseline_name="its rule",
            note=f"the {HOSTS - 1} others, from the 429 to {RETRY_AFTER_S} s after; "
            f"fastest {max(others):.1f}/s",
        ),
    ]


def run(*, quick: bool) -> list[Figure]:
    sizes = QUICK if quick else FULL
    with tempfile.TemporaryDirectory() as workdir_name:
        return _one_run(Path(workdir_name), sizes)


def main() -> None:
    print(render(run(quick="--quick" in sys.argv[1:])))


if __name__ == "__main__":
    main()
