"""``python -m bench.cli_submit``: ``throttler submit --file`` of a JSONL file into the outbox.

Starts ``python -m api`` on a fresh SQLite file with a private Redis (no relay: every
task stays in the outbox), writes a file of greetings and times the real command,
``python -m cli submit --file``, from its start (interpreter included) to its exit; then
checks the outbox holds exactly one row per line. Each run writes new lines (their
derived idempotency keys are new), so no run replays another. Median over the runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.figures import Figure, Target, median, render
from bench.processes import ROOT, free_port, http_server, migrate
from devtools.redis_server import start_redis_server

# The figure: 100,000 lines at >= 10,000 tasks/s into the outbox.
TARGET = Target(at_least=10_000)


@dataclass(frozen=True, kw_only=True, slots=True)
class Sizes:
    lines: int
    runs: int


QUICK = Sizes(lines=3_000, runs=1)
FULL = Sizes(lines=100_000, runs=3)


def _write(path: Path, *, lines: int, run: int) -> None:
    with path.open("w") as handle:
        for number in range(lines):
            handle.write(f'{{"name": "greeting", "input": {{"name": "r{run}-{number}"}}}}\n')


def _outbox_rows(database: Path) -> int:
    with contextlib.closing(sqlite3.connect(database)) as connection:
        count: int = connection.execute("SELECT count(*) FROM outbox").fetchone()[0]
    return count


def run(*, quick: bool = False) -> list[Figure]:
    sizes = QUICK if quick else FULL
    rates: list[float] = []
    with tempfile.TemporaryDirectory() as workdir_name, contextlib.ExitStack() as servers:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        servers.callback(redis.stop)
        database = workdir / "bench.db"
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
            "REDIS_URL": redis.url,
            "API_PORT": str(port),
            "API_KEYS": "",
            "LOG_LEVEL": "WARNING",
        }
        migrate(env)
        base_url = servers.enter_context(http_server(["api"], env, port))
        for index in range(sizes.runs):
            path = workdir / f"tasks-{index}.jsonl"
            _write(path, lines=sizes.lines, run=index)
            before = _outbox_rows(database)
            started = time.monotonic()
            subprocess.run(
                [sys.executable, "-m", "cli", "--url", base_url, "submit", "--file", str(path)],
                cwd=ROOT,
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            elapsed_s = time.monotonic() - started
            written = _outbox_rows(database) - before
            if written != sizes.lines:
                raise RuntimeError(f"{written} outbox rows for {sizes.lines} lines")
            rates.append(sizes.lines / elapsed_s)
    return [
        Figure(
            name="throttler submit --file into the outbox (SQLite)",
            value=median(rates),
            unit="tasks/s",
            target=TARGET,
            note=f"{sizes.lines:,} lines, median of {sizes.runs}, process start to exit",
        )
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    print(render(run(quick=args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
