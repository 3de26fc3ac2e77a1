"""The real `throttler` command (`python -m cli`) against real `python -m api|relay|worker`."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, cluster
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def port() -> int:
    return free_port()


def throttler(
    port: int, *args: str, timeout_s: float = 90, key: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "THROTTLER_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "cli", "--url", f"http://127.0.0.1:{port}", *args],
        cwd=ROOT,
        env={**env, "THROTTLER_API_KEY": key} if key else env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )


def start(port: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "--url", f"http://127.0.0.1:{port}", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_jsonl(path: Path, items: Sequence[Mapping[str, object]]) -> Path:
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


async def task_count(database_url: str) -> int:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            return int((await connection.execute(text("SELECT count(*) FROM tasks"))).scalar_one())
    finally:
        await engine.dispose()


async def api_up(port: int) -> bool:
    async with httpx.AsyncClient() as http:
        try:
            return (await http.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        except httpx.TransportError:
            return False


@pytest.fixture
def env(database_url: str, redis_url: str, port: int) -> dict[str, str]:
    return {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "API_PORT": str(port)}


@pytest.fixture
def running(env: dict[str, str], tmp_path: Path) -> Iterator[Cluster]:
    with cluster(env=env, log_dir=tmp_path) as components:
        yield components


async def test_submit_file_survives_a_late_api_and_a_rerun_creates_nothing(
    database_url: str, port: int, running: Cluster, tmp_path: Path
) -> None:
    lines = [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(2_500)]
    lines[7]["idempotency_key"] = "my-own-key"
    tasks = write_jsonl(tmp_path / "tasks.jsonl", lines)
    # The CLI starts first: every batch is refused until the API listens, then written once.
    cli = start(port, "submit", "--file", str(tasks))
    running.start("api")
    out, err = cli.communicate(timeout=90)
    assert cli.returncode == 0, out + err
    assert "submitted 2500 tasks (0 replayed)" in out
    assert await task_count(database_url) == 2_500

    again = throttler(port, "submit", "--file", str(tasks))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted 2500 tasks (2500 replayed)" in again.stdout
    assert await task_count(database_url) == 2_500

    # A bad item: its line number and field, exit 2, nothing of its batch written.
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [{"name": "greeting", "input": {"name": "ok"}}, {"name": "greeting", "input": {}}],
    )
    refused = throttler(port, "submit", "--file", str(bad))
    assert refused.returncode == 2
    assert f"{bad}:2: input.name" in refused.stderr
    assert await task_count(database_url) == 2_500


async def test_submit_file_rides_out_503s_while_the_database_is_locked(
    database_url: str, env: dict[str, str], port: int, tmp_path: Path
) -> None:
    if not database_url.startswith("sqlite"):
        pytest.skip("holds SQLite's write lock")
    tasks = write_jsonl(
        tmp_path / "tasks.jsonl",
        [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(1_500)],
    )
    # A short lock timeout: a locked database fails the intake's transaction, a 503.
    with cluster(env={**env, "DATABASE_TIMEOUT_S": "0.2"}, log_dir=tmp_path) as running:
        running.start("api")
        await wait_for(lambda: api_up(port), timeout_s=30, interval_s=0.1, message="API up")
        lock = sqlite3.connect(database_url.split("///", 1)[1], isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")
        cli = start(port, "submit", "--file", str(tasks))
        try:
            assert cli.stderr is not None
            told = await asyncio.wait_for(
                asyncio.to_thread(_line_with, cli.stderr, "HTTP 503"), timeout=60
            )
            assert "retrying" in told
        except BaseException:
            cli.kill()
            cli.communicate()
            raise
        finally:
            lock.execute("COMMIT")
            lock.close()
        out, err = cli.communicate(timeout=60)
    assert cli.returncode == 0, out + err
    assert "submitted 1500 tasks" in out
    assert await task_count(database_url) == 1_500


def _line_with(stream: IO[str], needle: str) -> str:
    """The first line of ``stream`` containing ``needle`` (blocking)."""
    for line in stream:
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r}")


async def test_commands_against_a_running_cluster(
    port: int, running: Cluster, tmp_path: Path
) -> None:
    running.start("api")
    await wait_for(lambda: api_up(port), timeout_s=30, interval_s=0.1, message="API up")
    running.start("relay")
    running.start("worker")

    good = write_jsonl(
        tmp_path / "good.jsonl",
        [{"name": "greeting", "input": {"name": f"g{i}"}} for i in range(40)],
    )
    waited = throttler(port, "submit", "--file", str(good), "--wait")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert "40 succeeded, 0 did not" in waited.stdout

    # Loopback is refused by the worker's address guard: the task fails for good.
    failing = write_jsonl(
        tmp_path / "failing.jsonl",
        [
            {"name": "greeting", "input": {"name": "fine"}},
            {"name": "download", "input": {"url": f"http://127.0.0.1:{free_port()}/x"}},
        ],
    )
    failed = throttler(port, "submit", "--file", str(failing), "--wait")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "1 succeeded, 1 did not" in failed.stdout

    one = throttler(port, "submit", "greeting", "--input", '{"name": "Ada"}', "--wait")
    assert one.returncode == 0, one.stderr
    task_id = json.loads(one.stdout)["task_id"]
    assert "Hello, Ada!" in one.stdout

    shown = throttler(port, "show", task_id)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded" in shown.stdout
    assert "submitted" in shown.stdout
    assert "queued" in shown.stdout

    listed = throttler(port, "tasks", "--status", "failed")
    assert listed.returncode == 0, listed.stderr
    assert "download" in listed.stdout
    assert "greeting" not in listed.stdout

    # Pause greetings so the next one stays pending, then cancel and retry it.
    paused = throttler(port, "pause", "task:greeting", "--for", "600")
    assert paused.returncode == 0, paused.stderr
    assert '"paused_until"' in paused.stdout
    assert "null" not in paused.stdout.split("paused_until")[1][:8]
    held = json.loads(throttler(port, "submit", "greeting", "--input", '{"name": "B"}').stdout)
    cancelled = throttler(port, "cancel", held["task_id"])
    assert cancelled.returncode == 0, cancelled.stderr
    assert '"cancelled"' in cancelled.stdout
    retried = throttler(port, "retry", held["task_id"])
    assert retried.returncode == 0, retried.stderr
    assert '"pending"' in retried.stdout
    by_filter = throttler(port, "cancel", "--status", "pending", "--name", "greeting")
    assert by_filter.returncode == 0, by_filter.stderr
    assert by_filter.stdout.startswith("1 tasks")
    resumed = throttler(port, "resume", "task:greeting")
    assert resumed.returncode == 0, resumed.stderr

    set_rule = throttler(port, "limit", "task:download", "--rate", "5/s", "--burst", "2")
    assert set_rule.returncode == 0, set_rule.stderr
    rules = throttler(port, "limits")
    assert "task:download" in rules.stdout
    assert "5/s" in rules.stdout

    nodes = throttler(port, "nodes")
    assert nodes.returncode == 0, nodes.stderr
    assert "relay" in nodes.stdout
    assert "worker" in nodes.stdout

    top = throttler(port, "top", "--once")
    assert top.returncode == 0, top.stderr
    for shown_in_top in ("all tasks", "pending", "task:download", "5/s", "relay", "worker"):
        assert shown_in_top in top.stdout, top.stdout

    missing = throttler(port, "show", "0" * 32)
    assert missing.returncode == 2
    assert "404" in missing.stderr


def test_an_unreachable_api_names_the_url() -> None:
    port = free_port()
    result = throttler(port, "limits")
    assert result.returncode == 2
    assert f"http://127.0.0.1:{port}" in result.stderr


async def test_the_key_from_the_environment_or_option_reaches_the_api(
    database_url: str, env: dict[str, str], port: int, tmp_path: Path
) -> None:
    keys = {"API_KEYS": "k-acme:acme,k-ops:ops", "API_ADMIN_KEYS": "k-ops"}
    with cluster(env={**env, **keys}, log_dir=tmp_path) as running:
        running.start("api")
        await wait_for(lambda: api_up(port), timeout_s=30, interval_s=0.1, message="API up")
        anonymous = throttler(port, "limits")
        assert anonymous.returncode == 2
        assert "401" in anonymous.stderr

        tasks = write_jsonl(
            tmp_path / "tasks.jsonl",
            [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(10)],
        )
        submitted = throttler(port, "submit", "--file", str(tasks), key="k-acme")
        assert submitted.returncode == 0, submitted.stderr
        assert await task_count(database_url) == 10

        not_admin = throttler(port, "limit", "cluster", "--rate", "5/s", key="k-acme")
        assert not_admin.returncode == 2
        assert "403" in not_admin.stderr
        admin = throttler(port, "--key", "k-ops", "limit", "cluster", "--rate", "5/s")
        assert admin.returncode == 0, admin.stderr
        assert '"5/s"' in admin.stdout
