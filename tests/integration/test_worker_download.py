"""The download task against a local HTTP server: results, status handling, caps, the guard."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    fast_retries,
    running_relay,
    running_worker,
    wait_final,
)
from tests.support import event_history
from throttler.db import SessionFactory
from throttler.models import Task
from throttler.settings import Settings

BODY = b"throttled bytes\n" * 100
BIG_BODY = b"x" * 5000


@dataclass
class FileServer:
    """A local HTTP server that records every path it was asked for."""

    port: int
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str, *, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self, path: str) -> int:
        with self.lock:
            return self.paths.count(path)


def _handler(server_state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.0: one response per connection, so a body without Content-Length is
        # delimited by the close.
        def do_GET(self) -> None:
            with server_state.lock:
                server_state.paths.append(self.path)
                flaky_hits = server_state.paths.count("/flaky")
            if self.path == "/flaky" and flaky_hits == 1:
                self._send(500, b"try later")
            elif self.path in ("/file", "/flaky"):
                self._send(200, BODY, content_type="text/plain; charset=utf-8")
            elif self.path == "/missing":
                self._send(404, b"no such file")
            elif self.path == "/big":
                self._send(200, BIG_BODY)
            elif self.path == "/big-unsized":
                self._send(200, BIG_BODY, sized=False)
            elif self.path == "/redirect":
                self._redirect("/file")
            elif self.path == "/redirect-unspecified":
                self._redirect(server_state.url("/file", host="0.0.0.0"))
            elif self.path == "/redirect-ftp":
                self._redirect("ftp://127.0.0.1/file")
            elif self.path == "/loop":
                self._redirect("/loop")
            else:
                self._send(400, b"unknown path")

        def _send(
            self,
            status: int,
            body: bytes,
            *,
            content_type: str = "application/octet-stream",
            sized: bool = True,
        ) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if sized:
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _redirect(self, location: str) -> None:
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            """Keep test output quiet."""

    return Handler


@pytest.fixture
def file_server() -> Iterator[FileServer]:
    state = FileServer(port=0)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def trusted(settings: Settings) -> Settings:
    """Settings for a trusted network: the local server may be fetched."""
    return fast_retries(settings, download_allow_private=True)


async def _download(settings: Settings, sessions: SessionFactory, url: str) -> Task:
    # A relay too: a retry goes back through the outbox.
    async with (
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings),
    ):
        task_id = await dispatch(sessions, pool, settings, name="download", payload={"url": url})
        return await wait_final(sessions, task_id)


async def test_download_reports_digest_size_and_type(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    task = await _download(trusted, sessions, file_server.url("/file"))

    assert task.status == "succeeded"
    assert task.attempts == 1
    assert task.result == {
        "url": file_server.url("/file"),
        "status_code": 200,
        "content_type": "text/plain; charset=utf-8",
        "content_length": len(BODY),
        "sha256": hashlib.sha256(BODY).hexdigest(),
    }
    async with sessions() as session:
        assert await event_history(session, task.id) == [
            "submitted",
            "queued",
            "started",
            "succeeded",
        ]


async def test_redirect_is_followed_and_final_url_reported(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    task = await _download(trusted, sessions, file_server.url("/redirect"))

    assert task.status == "succeeded"
    assert task.result is not None
    assert task.result["url"] == file_server.url("/file")
    assert task.result["sha256"] == hashlib.sha256(BODY).hexdigest()


async def test_client_error_fails_without_retry(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    task = await _download(trusted, sessions, file_server.url("/missing"))

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error == f"PermanentError: HTTP 404 from {file_server.url('/missing')}"
    assert file_server.hits("/missing") == 1


async def test_server_error_is_retried(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    task = await _download(trusted, sessions, file_server.url("/flaky"))

    assert task.status == "succeeded"
    assert task.attempts == 2
    assert file_server.hits("/flaky") == 2
    async with sessions() as session:
        assert "retrying" in await event_history(session, task.id)


@pytest.mark.parametrize("path", ["/big", "/big-unsized"])
async def test_oversized_body_fails(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer, path: str
) -> None:
    settings = trusted.model_copy(update={"download_max_bytes": 1000})
    task = await _download(settings, sessions, file_server.url(path))

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error is not None
    assert "exceeds DOWNLOAD_MAX_BYTES (1000 bytes)" in task.error


async def test_redirect_to_refused_address_fails(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    # Even on a trusted network the unspecified address (which reaches this host) is refused.
    task = await _download(trusted, sessions, file_server.url("/redirect-unspecified"))

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error is not None
    assert "0.0.0.0" in task.error
    assert "unspecified address" in task.error
    assert file_server.paths == ["/redirect-unspecified"]


async def test_redirect_to_other_scheme_fails(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    task = await _download(trusted, sessions, file_server.url("/redirect-ftp"))

    assert task.status == "failed"
    assert task.error is not None
    assert "only http and https" in task.error


async def test_redirect_loop_stops_at_the_limit(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    settings = trusted.model_copy(update={"download_max_redirects": 2})
    task = await _download(settings, sessions, file_server.url("/loop"))

    assert task.status == "failed"
    assert task.error is not None
    assert "too many redirects" in task.error
    assert file_server.hits("/loop") == 3


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_loopback_is_refused_by_default(
    settings: Settings, sessions: SessionFactory, file_server: FileServer, host: str
) -> None:
    assert settings.download_allow_private is False
    task = await _download(settings, sessions, file_server.url("/file", host=host))

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error is not None
    assert "a loopback address" in task.error
    assert "DOWNLOAD_ALLOW_PRIVATE" in task.error
    assert file_server.paths == []
