"""Probe: how many spellings of one address a ``host:`` rate limit releases at once.

``python -m bench.probes.host_spellings [--code-dir DIR]`` runs the api and relay of
``DIR`` (this checkout by default; e.g. a worktree at ``main`` for the figure before a
change) on a fresh SQLite file and a private Redis, with
``RELAY_LIMITS="host:127.0.0.1 rate=1/m"``. It submits one download per spelling of
127.0.0.1 through the REST API, waits for the relay's first release and then
``SETTLE_S`` more, and prints how many were released. One token a minute: 1 is right;
each spelling escaping the rule adds one. No worker runs, so released tasks stay queued.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from pathlib import Path

import httpx

from bench.processes import ROOT, free_port, http_server, migrate, module_process, stack_env
from devtools.redis_server import start_redis_server

SPELLINGS = (
    "127.0.0.1",
    "127.1",
    "2130706433",
    "0x7f000001",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
)
RULE = "host:127.0.0.1 rate=1/m"
# After the first release, time for the relay to release any other it would: dozens of
# its 50 ms polls, generous on a loaded machine.
SETTLE_S = 3.0
FIRST_RELEASE_TIMEOUT_S = 30.0


def released(database: Path) -> int:
    with sqlite3.connect(database) as connection:
        (count,) = connection.execute(
            "SELECT count(*) FROM tasks WHERE status != 'pending'"
        ).fetchone()
    return int(count)


def measure(code_dir: Path) -> int:
    """Released at once of the len(SPELLINGS) downloads, with ``code_dir``'s api and relay."""
    with tempfile.TemporaryDirectory() as workdir_name:
        workdir = Path(workdir_name)
        redis = start_redis_server(workdir=workdir / "redis")
        try:
            database = workdir / "probe.db"
            port = free_port()
            env = stack_env(database=database, redis_url=redis.url, port=port, RELAY_LIMITS=RULE)
            migrate(env, code_dir=code_dir)
            with http_server(["api"], env, port, code_dir=code_dir) as base_url:
                for spelling in SPELLINGS:
                    answer = httpx.post(
                        f"{base_url}/api/v1/task/download",
                        json={"url": f"http://{spelling}:8080/file"},
                        timeout=10.0,
                        trust_env=False,
                    )
                    answer.raise_for_status()
            with module_process(["relay"], env, code_dir=code_dir):
                deadline = time.monotonic() + FIRST_RELEASE_TIMEOUT_S
                while released(database) == 0:
                    if time.monotonic() > deadline:
                        raise RuntimeError("the relay released nothing")
                    time.sleep(0.05)
                time.sleep(SETTLE_S)
                return released(database)
        finally:
            redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code-dir", type=Path, default=ROOT)
    args = parser.parse_args()
    count = measure(args.code_dir)
    print(
        f"{RULE}: {count} of {len(SPELLINGS)} spellings of 127.0.0.1 released at once "
        f"(within {SETTLE_S:g} s of the first; code: {args.code_dir.resolve()})"
    )


if __name__ == "__main__":
    main()
