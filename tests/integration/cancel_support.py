"""What the cancel tests share: the API with chosen side-effecting kinds."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from api.app import create_app
from throttler.settings import Settings
from throttler.store.cancels import CancelStore


@asynccontextmanager
async def api_with_side_effecting(
    settings: Settings, *, side_effecting: frozenset[str]
) -> AsyncIterator[httpx.AsyncClient]:
    """The API in this process; its cancels leave running tasks of ``side_effecting``
    kinds alone unless forced (the catalog has none by default)."""
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://api.test") as client,
    ):
        cancels: CancelStore = app.state.cancels
        cancels.side_effecting = side_effecting
        yield client
