"""Probe: the shortest gap between consecutive attempts of a failing download to one host.

``python -m bench.probes.retry_spacing [--code-dir DIR] [--backoff-s S]`` runs the api,
relay and worker of ``DIR`` (this checkout by default; e.g. a worktree at ``main`` for
the figure before a change) on a fresh SQLite file and a private Redis, with
``RELAY_LIMITS="host:* rate=1/s"`` and private targets allowed. It submits one download
of a local HTTP server that answers 500 to everything, waits until the task is final,
and prints the gaps between the requests' arrival times at the server. A warm-up download
of the same server under another host name (``localhost``, its own bucket) runs first, so
that a fresh worker's first download (imports, client set-up: about 0.2 s) does not
shorten the first gap. Under the rule
no gap may be shorter than 1 s, whatever ``WORKER_RETRY_BACKOFF_S`` (``--backoff-s``,
default 1, the setting's default) says, except for the jitter of execution: the limiter
spaces the releases (the ``queued`` events, also printed), and an attempt that starts a
few tens of ms later after its release than the next one did (a cold first download, a
poll) arrives that much closer to the next.
"""

from __future__ import annotations

import argparse
import itertools
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from bench.processes import ROOT, free_port, http_server, migrate, module_process, stack_env
from devtools.redis_server import start_redis_server

RULE = "host:* rate=1/s"
MAX_TRIES = 5
FINAL_TIMEOUT_S = 180.0
WARM_UP_PATH = "/warm-up"


@contextmanager
def failing_server() -> Iterator[tuple[str, list[float]]]:
    """A local server answering 500; yield its URL and the requests' arrival times."""
    arrivals: list[float] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == WARM_UP_PATH:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            arrivals.append(time.monotonic())
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Quiet."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", arrivals
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def final_status(database: Path, task_id: str) -> str | None:
    with sqlite3.connect(database) as connection:
        row = connection.execute(
            "SELECT status FROM tasks WHERE id = ? "
            "AND status IN ('succeeded', 'failed', 'cancelled')",
            (task_id,),
        ).fetchone()
    return None if row is None else str(row[0])


def submit_and_wait(base_url: str, database: Path, url: str) -> tuple[str, str]:
    """Submit a download of ``url``; return its task id and final status."""
    answer = httpx.post(
        f"{base_url}/api/v1/task/download", json={"url": url}, timeout=10.0, trust_env=False
    )
    answer.raise_for_status()
    task_id = str(answer.json()["task_id"])
    deadline = time.monotonic() + FINAL_TIMEOUT_S
    while (status := final_status(database, task_id)) is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not final after {FINAL_TIMEOUT_S:g} s")
        time.sleep(0.1)
    return task_id, status


def release_gaps(database: Path, task_id: str) -> list[float]:
    """The gaps between the task's ``queued`` events (the limiter's grants), in s."""
    with sqlite3.connect(database) as connection:
        rows = connection.execute(
            "SELECT at FROM task_events WHERE task_id = ? AND event = 'queued' ORDER BY id",
            (task_id,),
        ).fetchall()
    moments = [datetime.fromisoformat(at).timestamp() for (at,) in rows]
    return [b - a for a, b in itertools.pairwise(moments)]


@dataclass(frozen=True, kw_only=True)
class Spacing:
    arrivals: list[float]  # gaps between requests at the server, s
    releases: list[float]  # gaps between the relay's releases (queued events), s
    status: str


def measure(code_dir: Path, *, backoff_s: float) -> Spacing:
    """The gaps between attempts' arrivals and releases, and the task's final status."""
    with tempfile.TemporaryDirectory() as workdir_name, failing_server() as (address, arrivals):
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        try:
            database = workdir / "probe.db"
            port = free_port()
            env = stack_env(
                database=database,
                redis_url=redis.url,
                port=port,
                RELAY_LIMITS=RULE,
                DOWNLOAD_ALLOW_PRIVATE="true",
                WORKER_MAX_TRIES=str(MAX_TRIES),
                WORKER_RETRY_BACKOFF_S=str(backoff_s),
            )
            migrate(env, code_dir=code_dir)
            with (
                http_server(["api"], env, port, code_dir=code_dir) as base_url,
                module_process(["relay"], env, code_dir=code_dir),
                module_process(["worker"], env, code_dir=code_dir),
            ):
                port_part = address.rsplit(":", 1)[1]
                warm_up = f"http://localhost:{port_part}{WARM_UP_PATH}"
                if submit_and_wait(base_url, database, warm_up)[1] != "succeeded":
                    raise RuntimeError("the warm-up download failed")
                task_id, status = submit_and_wait(base_url, database, f"http://{address}/broken")
            return Spacing(
                arrivals=[b - a for a, b in itertools.pairwise(arrivals)],
                releases=release_gaps(database, task_id),
                status=status,
            )
        finally:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-dir", type=Path, default=ROOT)
    parser.add_argument("--backoff-s", type=float, default=1.0)
    args = parser.parse_args()
    spacing = measure(args.code_dir, backoff_s=args.backoff_s)
    gaps = spacing.arrivals
    releases = ", ".join(f"{gap:.3f}" for gap in spacing.releases) or "only the first"
    print(
        f"{RULE}, WORKER_RETRY_BACKOFF_S={args.backoff_s:g}: {len(gaps) + 1} attempts, "
        f"task {spacing.status}; minimal spacing at the server {min(gaps):.3f} s "
        f"(all: {', '.join(f'{gap:.3f}' for gap in gaps)}; releases by the relay: "
        f"{releases}; code: {args.code_dir.resolve()})"
    )


if __name__ == "__main__":
    main()
