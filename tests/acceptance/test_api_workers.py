"""``API_WORKERS=2``: the real ``python -m api`` serving one port from two processes.

Which process served a request is read from the kernel (/proc): the child holding the
accepted connection, each connection kept open after its answer.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, Component, cluster
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.slow

GREETING = "/api/v1/task/greeting"
START_TIMEOUT_S = 60.0
MAX_HEADER_LINE_BYTES = 1024


@pytest.fixture
def services(tmp_path: Path) -> Iterator[Cluster]:
    with cluster(env={"LOG_LEVEL": "INFO"}, log_dir=tmp_path) as running:
        yield running


def _env(database_url: str, redis_url: str, port: int, workers: int = 2) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "API_KEYS": "",
        "API_WORKERS": str(workers),
        "API_MAX_HEADER_LINE_BYTES": str(MAX_HEADER_LINE_BYTES),
    }


def _children(pid: int) -> list[int]:
    """Pids of ``pid``'s live children, read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _serving(api: Component) -> list[int]:
    """Pids of the API's serving children (not multiprocessing's resource tracker)."""
    serving = []
    for pid in _children(api.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in command:
            serving.append(pid)
    return serving


def _descendants(pid: int) -> list[int]:
    children = _children(pid)
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def _owners(serving: list[int], port: int, client_ports: set[int]) -> dict[int, int]:
    """Accepted connections from ``client_ports`` held by each serving process: pid -> count."""
    inodes: set[str] = set()  # of the server's side of those connections
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            local, remote, inode = columns[1], columns[2], columns[9]
            if int(local.rsplit(":", 1)[1], 16) == port and (
                int(remote.rsplit(":", 1)[1], 16) in client_ports
            ):
                inodes.add(inode)
    owners = {}
    for pid in serving:
        held = len(inodes & _socket_inodes(pid))
        if held:
            owners[pid] = held
    return owners


async def _started(api: Component, port: int, *, processes: int = 2) -> list[int]:
    async def ready() -> list[int]:
        if api.process.poll() is not None:
            raise AssertionError(f"api exited {api.process.returncode}:\n{api.output()[-3000:]}")
        serving = _serving(api)
        if len(serving) != processes or api.output().count("Application startup complete") < (
            processes
        ):
            return []
        return serving

    serving = await wait_for(ready, timeout_s=START_TIMEOUT_S, message="both API processes up")
    await wait_for(
        lambda: _answers_health(port), timeout_s=START_TIMEOUT_S, message="the API answering"
    )
    return serving


async def _answers_health(port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        return (await reader.read()).startswith(b"HTTP/1.1 200")
    finally:
        writer.close()


async def _oversized_header(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        filler = "x" * (MAX_HEADER_LINE_BYTES + 100)
        writer.write(f"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Filler: {filler}\r\n\r\n".encode())
        return await reader.readuntil(b"\r\n\r\n")
    finally:
        writer.close()


class Submitter:
    """Keep-alive connections posting greetings, each named after its request."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.connections: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.accepted: dict[str, str] = {}  # task id -> the name it was submitted with
        self.sent = 0

    async def open(self, count: int) -> None:
        for _ in range(count):
            self.connections.append(await asyncio.open_connection("127.0.0.1", self.port))

    def client_ports(self) -> set[int]:
        return {writer.get_extra_info("sockname")[1] for _, writer in self.connections}

    async def post(self, index: int) -> None:
        reader, writer = self.connections[index]
        self.sent += 1
        name = f"n{self.sent}"
        body = json.dumps({"name": name}).encode()
        writer.write(
            f"POST {GREETING} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next(
                line.split(b":", 1)[1]
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
        )
        answer = await reader.readexactly(length)
        if head.startswith(b"HTTP/1.1 202"):
            self.accepted[json.loads(answer)["task_id"]] = name
        else:
            raise AssertionError(f"{head[:40]!r} {answer[:300]!r}")

    async def post_on_each(self) -> None:
        await asyncio.gather(*(self.post(index) for index in range(len(self.connections))))

    async def close(self) -> None:
        for _, writer in self.connections:
            writer.close()


async def _tasks_in_database(database_url: str) -> dict[str, str]:
    """Every task's id -> its input's name."""
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            rows = (await connection.execute(text("SELECT id, payload FROM tasks"))).all()
    finally:
        await engine.dispose()
    payloads = {
        str(row[0]): row[1] if isinstance(row[1], dict) else json.loads(row[1]) for row in rows
    }
    return {task_id: payload["name"] for task_id, payload in payloads.items()}


async def test_two_processes_serve_one_port_and_stop_together(
    database_url: str, redis_url: str, services: Cluster
) -> None:
    port = free_port()
    api = services.start("api", extra_env=_env(database_url, redis_url, port))
    serving = await _started(api, port)
    submitter = Submitter(port)
    try:
        # New connections until each process holds some (the kernel picks who accepts).
        for _ in range(20):
            await submitter.open(8)
            await submitter.post_on_each()
            owners = _owners(serving, port, submitter.client_ports())
            if len(owners) == 2:
                break
        assert len(owners) == 2, f"one process served every connection: {owners}"
        assert sum(owners.values()) == len(submitter.connections)
        # Concurrent submissions on every connection: both group committers commit at once.
        for _ in range(5):
            await submitter.post_on_each()
        # SIGTERM with submissions in flight: each one answered 202 must be in the database.
        in_flight = asyncio.gather(
            *(submitter.post(index) for index in range(len(submitter.connections))),
            return_exceptions=True,
        )
        await asyncio.sleep(0)
        api.process.send_signal(signal.SIGTERM)
        await in_flight
    finally:
        await submitter.close()
    code = await asyncio.to_thread(api.process.wait, 30)
    assert code == 0, api.output()[-3000:]
    assert not [pid for pid in serving if _alive(pid)]
    assert "Finished server process" in api.output()
    stored = await _tasks_in_database(database_url)
    # Exactly once: every accepted submission is stored under its own id, nothing more
    # than was sent (a request cut by the shutdown may be stored without its 202).
    assert {task_id: stored.get(task_id) for task_id in submitter.accepted} == submitter.accepted
    assert len(set(stored.values())) == len(stored) <= submitter.sent
    assert len(submitter.accepted) >= submitter.sent - len(submitter.connections)


async def test_a_dead_process_is_replaced_and_a_dead_parent_leaves_no_orphan(
    tmp_path: Path, redis_url: str, services: Cluster
) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'api.db'}"
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url},
        check=True,
        capture_output=True,
    )
    port = free_port()
    api = services.start("api", extra_env=_env(database_url, redis_url, port))
    first, second = await _started(api, port)
    os.kill(first, signal.SIGKILL)

    async def replaced() -> list[int]:
        serving = _serving(api)
        return serving if len(serving) == 2 and first not in serving else []

    serving = await wait_for(replaced, timeout_s=START_TIMEOUT_S, message="a replacement")
    assert second in serving
    assert "api.process_died" in api.output()

    async def both_started() -> bool:
        return api.output().count("Application startup complete") >= 3

    await wait_for(both_started, timeout_s=START_TIMEOUT_S, message="the replacement serving")
    submitter = Submitter(port)
    try:
        await submitter.open(4)
        await submitter.post_on_each()
    finally:
        await submitter.close()
    assert len(submitter.accepted) == 4
    # Each process serves with the bounded parser (api.http_limits): a header line over
    # API_MAX_HEADER_LINE_BYTES gets 431 whichever process takes the connection.
    refusals = await asyncio.gather(*(_oversized_header(port) for _ in range(16)))
    assert all(answer.startswith(b"HTTP/1.1 431") for answer in refusals), refusals

    # The parent killed outright cannot stop its children: they stop themselves.
    descendants = _descendants(api.process.pid)
    assert len(descendants) >= 2
    api.process.kill()
    api.process.wait()

    async def all_gone() -> bool:
        return not any(_alive(pid) for pid in descendants)

    await wait_for(all_gone, timeout_s=30, message="the orphaned children to stop")
    assert "api.parent_gone" in api.output()


def test_api_workers_must_be_a_positive_integer() -> None:
    for value in ("0", "two"):
        result = subprocess.run(
            [sys.executable, "-m", "api"],
            cwd=ROOT,
            env={**os.environ, "API_WORKERS": value},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 2
        assert "API_WORKERS" in result.stderr
