"""uvicorn's httptools protocol, with a bound on each request head's size and time.

httptools (the fast parser uvicorn picks) bounds neither: a header value grows for as
long as the client sends it, each chunk copied onto the bytes so far (quadratic CPU), and
a connection that never finishes its head, or never sends one, stays open for good
(uvicorn's keep-alive timer only runs between requests). h11 bounds the size but not the
time, and parses several times slower. So the head is bounded here, around the same
parser:

- size: the request line and each header line may hold ``max_line_bytes``, the whole
  head ``max_head_bytes``. A head still incomplete is measured by the bytes received,
  after each chunk the transport reads (so it may overshoot by one read, never more); a
  complete one by its parsed parts. Over the bound: 431 (414 for the request line),
  before any application code runs; then the connection is half-closed, and closed once
  the client closes its side or after ``LINGER_S``.
- time: a head must be complete ``timeout_s`` after the connection opens, or after the
  first bytes of a later request arrive; otherwise the connection is closed.

A request whose head arrives in one read, the usual case, arms no timer.
"""

from __future__ import annotations

import asyncio
import logging
from asyncio import TimerHandle
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from throttler.logs import fields
from throttler.settings import Settings

log = logging.getLogger(__name__)

# Bytes a header line adds to the head besides its name and value: ": " and CRLF.
_LINE_OVERHEAD = 4
# After a refusal, what the client still sends is read and dropped for this long before
# the connection closes: closing with unread data would reset it, and a reset may discard
# the answer before the client reads it.
LINGER_S = 2.0
_REASONS = {431: b"request header fields too large", 414: b"request line too long"}


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadLimits:
    max_head_bytes: int
    max_line_bytes: int
    timeout_s: float

    @classmethod
    def of(cls, settings: Settings) -> HeadLimits:
        return cls(
            max_head_bytes=settings.api_max_header_bytes,
            max_line_bytes=settings.api_max_header_line_bytes,
            timeout_s=settings.api_header_timeout_s,
        )


class _HeadRefusedError(Exception):
    """Raised in a parser callback to stop parsing; the status is on the protocol."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """``HttpToolsProtocol`` refusing heads over ``limits`` in size, closing them in time."""

    limits: ClassVar[HeadLimits]

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._reading_head = True  # False from a head's end until its message's end
        self._head_received = 0  # bytes of the head in progress, counted per read
        self._head_parsed = 0  # bytes of its header lines parsed so far
        self._head_began_in_read = False
        self._head_deadline: TimerHandle | None = None
        self._refusal: int | None = None  # status to answer instead of uvicorn's 400
        self._discarding = False  # refused: the rest of the connection is dropped

    # Connection events
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._discarding:
            return
        self._head_began_in_read = False
        super().data_received(data)
        if self._discarding or not self._reading_head or self.transport.is_closing():
            return
        # The head is still incomplete after this read. A head that began in it (or after
        # a message that ended in it) is counted from the next read: where it began is not
        # known, and the parsed parts are checked as each completes.
        if not self._head_began_in_read:
            self._head_received += len(data)
            if self._head_received > self.limits.max_head_bytes:
                self._refuse(431)
                return
        if self._head_deadline is None:
            self._arm_head_deadline()

    def send_400_response(self, msg: str) -> None:
        # uvicorn's answer to a parser error, which a refusal raised in a callback becomes.
        if self._refusal is None:
            super().send_400_response(msg)
        else:
            self._refuse(self._refusal)

    # Parser callbacks
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head = True
        self._head_received = 0
        self._head_parsed = 0
        self._head_began_in_read = True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.max_line_bytes:
            self._refusal = 414
            raise _HeadRefusedError

    def on_header(self, name: bytes, value: bytes) -> None:
        line = len(name) + len(value) + _LINE_OVERHEAD
        self._head_parsed += line
        if (
            line > self.limits.max_line_bytes
            or self._head_parsed + len(self.url) > self.limits.max_head_bytes
        ):
            self._refusal = 431
            raise _HeadRefusedError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._reading_head = False
        self._disarm_head_deadline()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # What arrives next is the next request's head (its deadline is armed on arrival;
        # until then uvicorn's keep-alive timer bounds the idle connection).
        self._reading_head = True
        self._head_received = 0
        self._head_began_in_read = True

    # Bounds
    def _arm_head_deadline(self) -> None:
        self._head_deadline = self.loop.call_later(self.limits.timeout_s, self._head_timed_out)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_timed_out(self) -> None:
        self._head_deadline = None
        if self._reading_head and not self.transport.is_closing():
            log.info(
                "http.head_timeout",
                extra=fields(client=_client(self.client), timeout_s=self.limits.timeout_s),
            )
            self.transport.close()

    def _refuse(self, status: int) -> None:
        """Answer ``status`` (431 or 414) and close: the rest of the request is not read."""
        log.info("http.head_refused", extra=fields(client=_client(self.client), status=status))
        self._refusal = status
        body = _REASONS[status]
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: text/plain; charset=utf-8\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
        self.transport.write(b"".join(head))
        # Half-close after the answer, drop what still comes, close for good after a while.
        self._discarding = True
        self._disarm_head_deadline()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._head_deadline = self.loop.call_later(LINGER_S, self.transport.close)


def _client(client: tuple[str, int] | None) -> str | None:
    return f"{client[0]}:{client[1]}" if client else None


def bounded_protocol(limits: HeadLimits) -> type[BoundedHttpToolsProtocol]:
    """The protocol class to give uvicorn (``http=``): it builds instances itself."""
    configured: type[BoundedHttpToolsProtocol] = type(
        "BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {"limits": limits}
    )
    return configured
