"""The API process under abusive clients: endless or oversized request heads, keyless bodies.

Each test runs ``python -m api`` as a subprocess and talks to it over raw sockets, since
what is tested lies in the server (uvicorn's protocol, api.http_limits) or in what is
answered before a body is sent. Bounds are set small (a 4 KiB head, a 1 s head deadline)
so that the tests are quick; every wait is on a condition, with a generous timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devtools.redis_server import RedisServer, free_port
from tests.acceptance.processes import Component, cluster
from tests.support import wait_for

MAX_HEAD = 4096
MAX_LINE = 1024
HEAD_TIMEOUT_S = 1.0
KEY = "k1"
# Generous: the machine running the tests may be loaded.
ANSWER_TIMEOUT_S = 30.0
CLOSE_TIMEOUT_S = 30.0


@dataclass(frozen=True, kw_only=True)
class Api:
    port: int
    component: Component

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
def api_process(tmp_path: Path, sqlite_template: Path, redis_server: RedisServer) -> Iterator[Api]:
    database = tmp_path / "api.db"
    shutil.copyfile(sqlite_template, database)
    port = free_port()
    env = {
        "DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "REDIS_URL": redis_server.url,
        "API_PORT": str(port),
        "API_KEYS": f"{KEY}:acme",
        "API_MAX_HEADER_BYTES": str(MAX_HEAD),
        "API_MAX_HEADER_LINE_BYTES": str(MAX_LINE),
        "API_HEADER_TIMEOUT_S": str(HEAD_TIMEOUT_S),
        "API_KEEP_ALIVE_S": "1",
    }
    with cluster(env=env, log_dir=tmp_path) as running:
        yield Api(port=port, component=running.start("api"))


@pytest.fixture
async def api(api_process: Api) -> Api:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_process.port}") as http:

        async def alive() -> bool:
            assert api_process.component.process.poll() is None, api_process.component.output()
            try:
                return (await http.get("/healthz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(alive, timeout_s=ANSWER_TIMEOUT_S, message="the api to answer")
    return api_process


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (or resets it)."""
    received = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await asyncio.wait_for(reader.read(65536), CLOSE_TIMEOUT_S):
            received += chunk
    return received


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


async def _status(reader: asyncio.StreamReader) -> bytes:
    line = await asyncio.wait_for(reader.readline(), ANSWER_TIMEOUT_S)
    return line.split(b" ")[1] if line else b""


async def _healthz(api: Api) -> int:
    async with httpx.AsyncClient(timeout=ANSWER_TIMEOUT_S) as http:
        return (await http.get(f"http://127.0.0.1:{api.port}/healthz")).status_code


async def test_an_endless_header_is_refused_with_431_and_closed(api: Api) -> None:
    reader, writer = await api.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: api\r\nx-endless: ")

    async def send_forever() -> None:
        # Up to 8 MiB, the head never finished; the server must cut it short.
        with contextlib.suppress(ConnectionError):
            for _ in range(1024):
                writer.write(b"a" * 8192)
                await writer.drain()

    sender = asyncio.create_task(send_forever())
    answer = await _answer(reader)
    await asyncio.wait_for(sender, CLOSE_TIMEOUT_S)
    await _close(writer)

    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"connection: close" in answer


@pytest.mark.parametrize(
    ("head", "status"),
    [
        # Many short lines, together over the bound.
        (b"GET /healthz HTTP/1.1\r\nhost: api\r\n" + b"x-many: 0123456789\r\n" * 300, b"431"),
        # One line over its own bound.
        (b"GET /healthz HTTP/1.1\r\nhost: api\r\nx-long: " + b"a" * 2000 + b"\r\n", b"431"),
        (b"GET /healthz?" + b"q" * 2000 + b" HTTP/1.1\r\nhost: api\r\n", b"414"),
    ],
    ids=["head", "line", "request-line"],
)
async def test_a_complete_head_over_a_bound_is_refused(
    api: Api, head: bytes, status: bytes
) -> None:
    reader, writer = await api.connect()
    writer.write(head + b"\r\n")
    answer = await _answer(reader)
    await _close(writer)

    assert answer.split(b" ")[1] == status, answer[:200]
    assert await _healthz(api) == 200


async def test_a_head_within_the_bounds_is_served(api: Api) -> None:
    reader, writer = await api.connect()
    padding = b"x-pad: " + b"p" * (MAX_LINE - 20) + b"\r\n"
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: api\r\n" + padding * 3 + b"\r\n")
    status = await _status(reader)
    await _close(writer)

    assert status == b"200"


async def test_a_trickling_head_is_closed_at_its_deadline(api: Api) -> None:
    reader, writer = await api.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\n")

    async def trickle() -> None:
        # A valid header line every 50 ms, never the blank line that ends the head.
        with contextlib.suppress(ConnectionError):
            for index in range(int(CLOSE_TIMEOUT_S / 0.05)):
                writer.write(b"x-%d: y\r\n" % index)
                await writer.drain()
                await asyncio.sleep(0.05)

    trickler = asyncio.create_task(trickle())
    answer = await _answer(reader)  # returns once the server closes the connection
    trickler.cancel()
    await _close(writer)

    assert answer == b""


async def test_a_connection_sending_only_blank_lines_is_closed(api: Api) -> None:
    """After a response, blank lines before the next request stop uvicorn's keep-alive timer."""
    reader, writer = await api.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nhost: api\r\n\r\n")
    assert await _status(reader) == b"200"
    await asyncio.wait_for(reader.readuntil(b'{"status":"ok"}'), ANSWER_TIMEOUT_S)

    async def blank_lines() -> None:
        with contextlib.suppress(ConnectionError):
            for _ in range(int(CLOSE_TIMEOUT_S / 0.05)):
                writer.write(b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)

    sender = asyncio.create_task(blank_lines())
    assert await _answer(reader) == b""  # closed by the server (else a timeout)
    sender.cancel()
    await _close(writer)


async def test_unfinished_heads_are_all_closed_and_healthz_answers_meanwhile(api: Api) -> None:
    connections = [await api.connect() for _ in range(300)]
    for _, writer in connections:
        writer.write(b"GET /healthz HTTP/1.1\r\nhost: api\r\n")
    for _, writer in connections:
        await writer.drain()

    assert await _healthz(api) == 200
    answers = await asyncio.gather(*(_answer(reader) for reader, _ in connections))
    for _, writer in connections:
        await _close(writer)

    assert set(answers) == {b""}  # each closed by the server, unanswered
    assert await _healthz(api) == 200


async def test_a_body_without_a_valid_key_is_refused_before_it_is_sent(api: Api) -> None:
    for authorization in (b"", b"authorization: Bearer wrong\r\n"):
        reader, writer = await api.connect()
        writer.write(
            b"POST /api/v1/tasks HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\n"
            b"content-length: 4194304\r\n" + authorization + b"\r\n"
        )
        # Not one byte of the body is sent.
        status = await _status(reader)
        await _close(writer)

        assert status == b"401"


async def test_large_bodies_on_a_keep_alive_connection_are_not_taken_for_heads(api: Api) -> None:
    """A body read in many chunks, then the next request: neither counts as a head."""
    items = [{"name": "greeting", "input": {"name": f"{i:0200d}"}} for i in range(500)]
    body = json.dumps({"tasks": items}).encode()
    assert len(body) > 20 * MAX_HEAD
    reader, writer = await api.connect()
    for _ in range(2):
        writer.write(
            b"POST /api/v1/tasks HTTP/1.1\r\nhost: api\r\ncontent-type: application/json\r\n"
            b"authorization: Bearer %s\r\ncontent-length: %d\r\n\r\n%s"
            % (KEY.encode(), len(body), body)
        )
        assert await _status(reader) == b"202"
        headers = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT_S)
        length = int(headers.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await asyncio.wait_for(reader.readexactly(length), ANSWER_TIMEOUT_S)
    await _close(writer)
