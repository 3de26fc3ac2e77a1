"""``python -m bench.seed_design PORT REDIS_URL``: the seed's design, intake's same-run rival.

A FastAPI endpoint that validates the same body as ``POST /api/v1/task/greeting`` and
enqueues it straight into ARQ with ``ArqRedis.enqueue_job`` (no database, so nothing
durable before the 202), served like the bare endpoint (``bench.baseline.serve``).
Durable submission is asked to keep at least this rate.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from arq.connections import ArqRedis, RedisSettings, create_pool
from fastapi import FastAPI, Request, status

from bench.baseline import serve
from throttler.catalog import GREETING, GreetingInput


def create_app(redis_url: str) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.arq = await create_pool(RedisSettings.from_dsn(redis_url))
        try:
            yield
        finally:
            await app.state.arq.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/api/v1/task/greeting", status_code=status.HTTP_202_ACCEPTED)
    async def submit(body: GreetingInput, request: Request) -> dict[str, str]:
        # The pool straight from the app's state, not through a dependency: the leanest
        # form of the design, so the rival is not slowed by anything it does not need.
        pool: ArqRedis = request.app.state.arq
        task_id = str(uuid.uuid4())
        job = await pool.enqueue_job(GREETING.name, body.model_dump(mode="json"), _job_id=task_id)
        if job is None:
            raise RuntimeError(f"ARQ refused job id {task_id}")
        return {"task_id": task_id, "name": body.name}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def main() -> None:
    serve(create_app(sys.argv[2]), port=int(sys.argv[1]))


if __name__ == "__main__":
    main()
