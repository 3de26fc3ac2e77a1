"""What the benchmarks share: free ports, migrated databases, servers run as subprocesses.

Processes run the code of ``code_dir`` (this checkout unless told otherwise): its
directory is the working directory and ``PYTHONPATH``, ahead of the editable install of
this checkout, so one harness can measure another checkout of the project (say, the code
before a change) with this interpreter.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 30.0
# Where a benchmark finds a PostgreSQL server it may create databases on.
POSTGRES_ENVS = ("BENCH_POSTGRES_URL", "TEST_POSTGRES_URL")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def code_env(env: Mapping[str, str], code_dir: Path) -> dict[str, str]:
    """``env`` for a process that must import the project from ``code_dir``."""
    if code_dir.resolve() == ROOT:
        return dict(env)
    # Another checkout: never write bytecode into it (it may be read-only).
    return {**env, "PYTHONPATH": str(code_dir.resolve()), "PYTHONDONTWRITEBYTECODE": "1"}


def stack_env(*, database: Path, redis_url: str, port: int, **settings: str) -> dict[str, str]:
    """The environment of a private stack on a SQLite file: no keys, no limits, quiet logs.

    ``settings`` (upper-case setting names) add to or override these.
    """
    return {
        **os.environ,
        "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "API_KEYS": "",
        "RELAY_RATE": "0",
        "RELAY_LIMITS": "",
        "RELAY_MAX_INFLIGHT": "0",
        "LOG_LEVEL": "WARNING",
        **settings,
    }


def commit_of(code_dir: Path) -> str:
    """The short commit ``code_dir`` is checked out at ("" outside a git checkout)."""
    return subprocess.run(
        ["git", "-C", str(code_dir), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()


def migrate(env: Mapping[str, str], *, code_dir: Path = ROOT) -> None:
    """Bring the database of ``env["DATABASE_URL"]`` to ``code_dir``'s latest schema."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=code_dir,
        env=code_env(env, code_dir),
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


@contextmanager
def module_process(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    output: IO[bytes] | None = None,
    code_dir: Path = ROOT,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m ARGS`` from ``code_dir`` until the block ends, then stop it.

    Its output goes to ``output`` (discarded when None). SIGTERM first, as the services
    expect; SIGKILL if it has not exited within half a minute.
    """
    target = subprocess.DEVNULL if output is None else output
    process = subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=code_dir,
        env=code_env(env, code_dir),
        stdout=target,
        stderr=target,
    )
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def http_server(
    args: list[str], env: Mapping[str, str], port: int, *, code_dir: Path = ROOT
) -> Iterator[str]:
    """Run ``python -m ARGS`` until the block ends; yield its base URL once /healthz answers."""
    base_url = f"http://127.0.0.1:{port}"
    with module_process(args, env, code_dir=code_dir) as process:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                answer = httpx.get(f"{base_url}/healthz", timeout=1.0, trust_env=False)
                if answer.status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start")
            time.sleep(0.1)
        yield base_url


async def _admin(admin_url: str, statement: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


@contextmanager
def postgres_database(prefix: str, *, code_dir: Path = ROOT) -> Iterator[str | None]:
    """A fresh PostgreSQL database, at ``code_dir``'s schema, when a POSTGRES_ENVS URL is set.

    Yield its URL (None without a server); drop it afterwards, whatever happened.
    """
    admin_url = next((os.environ[name] for name in POSTGRES_ENVS if os.environ.get(name)), None)
    if not admin_url:
        yield None
        return
    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    asyncio.run(_admin(admin_url, f'CREATE DATABASE "{name}"'))
    url = admin_url.rsplit("/", 1)[0] + f"/{name}"
    try:
        migrate({**os.environ, "DATABASE_URL": url}, code_dir=code_dir)
        yield url
    finally:
        asyncio.run(_admin(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
