"""The download task against a local HTTP server: results, status handling, caps, the guard."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Awaitable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    fast_retries,
    running_relay,
    running_worker,
    wait_final,
)
from tests.support import event_history
from throttler.constants import RATE_BUCKET_KEY_PREFIX
from throttler.db import SessionFactory
from throttler.limits import LimitKey, RuleSet, Scope
from throttler.models import Task
from throttler.settings import Settings
from throttler.throttle import Bucket, RedisLimiter, Request

BODY = b"throttled bytes\n" * 100
BIG_BODY = b"x" * 5000


@dataclass
class FileServer:
    """A local HTTP server that records every path it was asked for."""

    port: int
    paths: list[str] = field(default_factory=list)
    # POSIX time of each request, in the order of ``paths``.
    times: list[float] = field(default_factory=list)
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
                server_state.times.append(time.time())
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
            elif self.path == "/to-localhost":
                # Another host key (a name) for this very server: a hop to another host.
                self._redirect(server_state.url("/file", host="localhost"))
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
    assert task.error == "AddressRefused: refused to connect to 0.0.0.0: its address is not allowed"
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
    # Only that the address is not allowed: not what "localhost" resolves to, nor its kind.
    assert task.error == f"AddressRefused: refused to connect to {host}: its address is not allowed"
    assert file_server.paths == []


# Redirect hops under host: limits (worker.hop_limits). The hop from 127.0.0.1 to
# "localhost" reaches the same server under another host key, as a real redirect to
# another host would.
LOCALHOST_BUCKET = RATE_BUCKET_KEY_PREFIX + "host:localhost"


def _limited(settings: Settings, rules: str, **overrides: Any) -> Settings:
    return settings.model_copy(update={"relay_limits": rules, **overrides})


async def _relay_started(redis: Redis) -> None:
    """Let the limiter set its drain floor, as the first relay of a new cluster does."""
    await RedisLimiter(redis=redis, rules=RuleSet(())).decide([], [])


async def _bucket(redis: Redis, key: str) -> dict[bytes, bytes]:
    # redis-py types hgetall for its sync and async clients alike.
    return await cast("Awaitable[dict[bytes, bytes]]", redis.hgetall(key))


async def test_a_redirect_to_another_host_takes_that_hosts_token(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer, redis: Redis
) -> None:
    settings = _limited(trusted, "host:localhost rate=1/m burst=1")
    await _relay_started(redis)
    assert await _bucket(redis, LOCALHOST_BUCKET) == {}

    task = await _download(settings, sessions, file_server.url("/to-localhost"))

    assert task.status == "succeeded", task.error
    assert file_server.paths == ["/to-localhost", "/file"]
    # The hop drew the bucket the relays draw for host:localhost: its one token is gone.
    state = await _bucket(redis, LOCALHOST_BUCKET)
    assert float(state[b"tokens"]) < 1.0 - 1e-3


async def test_a_redirect_waits_for_the_other_hosts_token(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer, redis: Redis
) -> None:
    settings = _limited(trusted, "host:localhost rate=2/s burst=1")
    # Another download (a relay's release) just took host:localhost's only token.
    limiter = RedisLimiter(redis=redis, rules=settings.limit_rules)
    bucket = Bucket(key=LimitKey(scope=Scope.HOST, value="localhost"), rate_per_s=2.0, burst=1)
    drained_at_s, decision = await limiter.decide([bucket], [Request(buckets=(0,))])
    assert decision.admitted == ((0, 0.0),)

    task = await _download(settings, sessions, file_server.url("/to-localhost"))

    assert task.status == "succeeded", task.error
    assert file_server.paths == ["/to-localhost", "/file"]
    # The hop went no sooner than the bucket held a token again (half a second later).
    assert file_server.times[1] >= drained_at_s + 0.5 - 0.01


async def test_a_redirect_whose_token_comes_too_late_is_retried_later(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer, redis: Redis
) -> None:
    settings = _limited(
        trusted, "host:localhost rate=1/h burst=1", download_timeout_s=2.0, worker_max_tries=1
    )
    limiter = RedisLimiter(redis=redis, rules=settings.limit_rules)
    bucket = Bucket(key=LimitKey(scope=Scope.HOST, value="localhost"), rate_per_s=1 / 3600, burst=1)
    _now, decision = await limiter.decide([bucket], [Request(buckets=(0,))])
    assert decision.admitted

    task = await _download(settings, sessions, file_server.url("/to-localhost"))

    assert task.status == "failed"
    assert task.error is not None
    assert task.error.startswith("RetriableError: redirect to http://localhost:")
    assert "host localhost's rate limit has no token" in task.error
    assert file_server.paths == ["/to-localhost"]


async def test_a_redirect_to_a_host_with_an_inflight_cap_is_refused(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer
) -> None:
    settings = _limited(trusted, "host:* inflight=5")

    task = await _download(settings, sessions, file_server.url("/to-localhost"))

    assert task.status == "failed"
    assert task.attempts == 1
    assert task.error == (
        f"RedirectRefused: refused redirect to {file_server.url('/file', host='localhost')}: "
        "host localhost has a limit on downloads in flight, which a redirect from another "
        "host cannot respect; submit the final URL instead"
    )
    assert file_server.paths == ["/to-localhost"]


async def test_a_redirect_within_the_host_takes_no_second_token(
    trusted: Settings, sessions: SessionFactory, file_server: FileServer, redis: Redis
) -> None:
    # The relay charged the download for 127.0.0.1; its redirect to 127.0.0.1 again (here
    # spelled 127.1) is the same download to the same host, and must not wait a minute.
    settings = _limited(trusted, "host:127.0.0.1 rate=1/m inflight=1")

    task = await _download(settings, sessions, file_server.url("/redirect", host="127.1"))

    assert task.status == "succeeded", task.error
    assert file_server.paths == ["/redirect", "/file"]
    assert await _bucket(redis, RATE_BUCKET_KEY_PREFIX + "host:127.0.0.1") == {}
