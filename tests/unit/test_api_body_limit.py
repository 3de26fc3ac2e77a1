"""The body cap as a pure ASGI middleware: declared, streamed, and replayed bodies."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from api.body_limit import BodyLimitMiddleware

LIMIT = 1024


async def echo(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer with the body it received, so the replay can be checked byte for byte."""
    body = await Request(scope, receive).body()
    await Response(body, media_type="application/octet-stream")(scope, receive, send)


def _client() -> httpx.AsyncClient:
    app = BodyLimitMiddleware(echo, max_body_bytes=LIMIT)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def _stream(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


@pytest.mark.parametrize("size", [0, 1, LIMIT])
async def test_body_up_to_the_limit_reaches_the_app_intact(size: int) -> None:
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with _client() as client:
        response = await client.post("/", content=body)

    assert response.status_code == 200
    assert response.content == body


async def test_declared_body_over_the_limit_is_413() -> None:
    async with _client() as client:
        response = await client.post("/", content=b"x" * (LIMIT + 1))

    assert response.status_code == 413
    assert response.json() == {"detail": f"request body exceeds {LIMIT} bytes"}


async def test_streamed_body_over_the_limit_is_413() -> None:
    async with _client() as client:
        response = await client.post("/", content=_stream(*[b"x" * 100] * 11))

    assert "content-length" not in response.request.headers
    assert response.status_code == 413


async def test_streamed_body_under_the_limit_is_joined_for_the_app() -> None:
    async with _client() as client:
        response = await client.post("/", content=_stream(b"ab", b"", b"cd"))

    assert response.status_code == 200
    assert response.content == b"abcd"


async def test_lying_content_length_is_still_counted() -> None:
    # A client that declares a small body and then sends more is caught by the count.
    scope: Scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(b"content-length", b"10")],
    }
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"x" * (LIMIT + 1), "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await BodyLimitMiddleware(echo, max_body_bytes=LIMIT)(scope, receive, send)

    assert sent[0]["status"] == 413


async def test_client_gone_before_the_body_ends_gets_no_answer() -> None:
    scope: Scope = {"type": "http", "method": "POST", "path": "/", "headers": []}
    messages: list[Message] = [
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await BodyLimitMiddleware(echo, max_body_bytes=LIMIT)(scope, receive, send)

    assert sent == []
