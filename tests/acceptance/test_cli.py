"""The real `throttler` command (`python -m cli`) against real `python -m api|relay|worker`."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import pty
import re
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
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


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


class PtyOutput:
    """What a process writes to its terminal (a pty), read by a thread as it comes."""

    def __init__(self, master: int) -> None:
        self._master = master
        self._chunks: list[bytes] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self._master, 65536)
            except OSError:  # EIO: the other end closed
                return
            if not chunk:
                return
            with self._lock:
                self._chunks.append(chunk)

    @property
    def raw(self) -> str:
        with self._lock:
            return b"".join(self._chunks).decode("utf-8", "replace")

    @property
    def text(self) -> str:
        return ANSI.sub("", self.raw)

    def close(self) -> None:
        self._thread.join(timeout=5)
        os.close(self._master)


def start_in_pty(port: int, *args: str) -> tuple[subprocess.Popen[bytes], PtyOutput]:
    master, slave = pty.openpty()
    # A wide terminal: rich draws every column.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 220, 0, 0))
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("THROTTLER_API_KEY", "NO_COLOR")},
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "PYTHONIOENCODING": "utf-8",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "cli", "--url", f"http://127.0.0.1:{port}", *args],
        cwd=ROOT,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    return process, PtyOutput(master)


def frames_with(text: str, pattern: str) -> list[tuple[int, str]]:
    """(frame number, what ``pattern`` caught) for each frame drawn, in order."""
    found = []
    for block in re.split(r"(?=pending \d+ · )", text):
        caught = re.search(pattern, block)
        number = re.search(r"frame (\d+)", block)
        if caught and number:
            found.append((int(number.group(1)), caught.group(1)))
    return found


async def test_top_redraws_with_changing_counts_and_ctrl_c_exits_cleanly(
    port: int, running: Cluster
) -> None:
    running.start("api")  # no relay: what is submitted stays pending
    await wait_for(lambda: api_up(port), timeout_s=30, interval_s=0.1, message="API up")
    process, output = start_in_pty(port, "top", "--interval", "0.2")
    try:

        async def drawn(pending: str, *, after: int = 0) -> int | None:
            for frame, count in frames_with(output.text, r"pending (\d+) · "):
                if count == pending and frame > after:
                    return frame
            return None

        first = await wait_for(lambda: drawn("0"), timeout_s=30, message="a frame with nothing")
        assert first is not None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
            for n in range(3):
                answer = await http.post("/api/v1/task/greeting", json={"name": f"t{n}"})
                assert answer.status_code == 202, answer.text
        later = await wait_for(
            lambda: drawn("3", after=first), timeout_s=30, message="a frame with 3 pending"
        )
        assert later is not None
        assert later > first
        # Redrawn in place (the cursor moved back up over the last frame), not scrolled.
        assert "\x1b[2K" in output.raw or re.search(r"\x1b\[\d*A", output.raw)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0, output.text[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output.close()
    assert "Traceback" not in output.text
    assert "KeyboardInterrupt" not in output.text


async def test_top_stops_after_count_frames(port: int, running: Cluster) -> None:
    running.start("api")
    await wait_for(lambda: api_up(port), timeout_s=30, interval_s=0.1, message="API up")
    shown = throttler(port, "top", "--count", "3", "--interval", "0.1")
    assert shown.returncode == 0, shown.stderr
    assert "frame 3" in shown.stdout
    for bad in (("--count", "0"), ("--interval", "0")):
        refused = throttler(port, "top", *bad)
        assert refused.returncode == 2
        assert bad[0] in refused.stderr


async def test_cancel_and_retry_by_label_and_creation_time_until_none_remain(
    database_url: str, port: int, running: Cluster, tmp_path: Path
) -> None:
    running.start("api")  # no relay: every task stays pending until cancelled
    await wait_for(lambda: api_up(port), timeout_s=30, interval_s=0.1, message="API up")
    # More than one call takes (10,000): the command must call again until none remain.
    many = write_jsonl(
        tmp_path / "many.jsonl",
        [{"name": "greeting", "input": {"name": f"m{i}"}} for i in range(10_050)],
    )
    submitted = throttler(port, "submit", "--file", str(many), timeout_s=300)
    assert submitted.returncode == 0, submitted.stderr
    cutoff = datetime.now(UTC).isoformat()
    await wait_for_clock_past(cutoff)
    labelled = write_jsonl(
        tmp_path / "labelled.jsonl",
        [
            {"name": "greeting", "input": {"name": f"l{i}"}, "keys": [f"tenant:{tenant}"]}
            for i, tenant in enumerate(["acme", "acme", "acme", "beta", "beta"])
        ],
    )
    assert throttler(port, "submit", "--file", str(labelled)).returncode == 0

    by_time = throttler(port, "cancel", "--created-before", cutoff, timeout_s=300)
    assert by_time.returncode == 0, by_time.stderr
    assert by_time.stdout.strip() == "10050 tasks"
    assert "still match" in by_time.stderr  # a second call was needed
    assert await status_counts(database_url) == {"cancelled": 10_050, "pending": 5}

    by_label = throttler(port, "cancel", "--key", "tenant:acme", "--status", "pending")
    assert by_label.returncode == 0, by_label.stderr
    assert by_label.stdout.strip() == "3 tasks"
    assert await status_counts(database_url) == {"cancelled": 10_053, "pending": 2}

    again = throttler(port, "retry", "--key", "tenant:acme", "--status", "cancelled")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "3 tasks"
    assert await status_counts(database_url) == {"cancelled": 10_050, "pending": 5}

    # Bad input: a clear error naming the option, exit 2, nothing sent.
    for args, needle in (
        (("cancel", "--key", "k-ops"), "--key"),
        (("cancel", "--created-before", "yesterday"), "--created-before"),
        (("cancel", "--created-before", "2026-11-29T12:00:00"), "timezone"),
        (("retry", "--status", "pending"), "--status"),
        (("cancel", "abc", "--name", "greeting"), "not both"),
        (("retry",), "give an ID or a filter"),
    ):
        refused = throttler(port, *args)
        assert refused.returncode == 2, (args, refused.stdout)
        assert needle in refused.stderr, (args, refused.stderr)
    assert await status_counts(database_url) == {"cancelled": 10_050, "pending": 5}


async def wait_for_clock_past(moment: str) -> None:
    """Wait until the clock has moved past ``moment``: tasks created next are after it."""
    at = datetime.fromisoformat(moment)

    async def past() -> bool:
        return datetime.now(UTC) > at

    await wait_for(past, timeout_s=5, interval_s=0.01, message="the clock to move on")


async def status_counts(database_url: str) -> dict[str, int]:
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT status, count(*) FROM tasks GROUP BY status")
            )
            return {str(status): int(count) for status, count in rows}
    finally:
        await engine.dispose()
