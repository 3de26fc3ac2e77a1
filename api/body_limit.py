"""Reject request bodies over a byte cap with 413, before any handler sees them."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """Answer 413 when the declared or the streamed (chunked) body exceeds the cap.

    The body is read in full before the app runs: every endpoint parses all of it anyway,
    and buffering at most ``max_body_bytes`` means a handler never starts (and so never
    writes) for a request that turns out to be too large halfway through.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        path_limits: Mapping[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Exact paths with their own cap (bulk submission takes many tasks in one body).
        self.path_limits = dict(path_limits or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_body_bytes = self.path_limits.get(scope["path"], self.max_body_bytes)
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            await self._too_large(scope, receive, send, max_body_bytes)
            return
        chunks: list[bytes] = []
        size = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away; there is no one to answer
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > max_body_bytes:
                await self._too_large(scope, receive, send, max_body_bytes)
                return
            chunks.append(chunk)
            more_body = message.get("more_body", False)

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # later messages, such as http.disconnect
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(
        self, scope: Scope, receive: Receive, send: Send, max_body_bytes: int
    ) -> None:
        response = JSONResponse(
            {"detail": f"request body exceeds {max_body_bytes} bytes"}, status_code=413
        )
        await response(scope, receive, send)
