"""``python -m bench.baseline PORT``: a bare FastAPI endpoint, the ceiling intake is compared to.

It validates the same body as ``POST /api/v1/task/greeting`` and answers 202 with a
fresh id, writing nothing; uvicorn runs it with the same settings as ``python -m api``.
"""

from __future__ import annotations

import sys
import uuid

import uvicorn
from fastapi import FastAPI, status

from throttler.catalog import GreetingInput


def create_app() -> FastAPI:
    app = FastAPI()

    @app.post("/api/v1/task/greeting", status_code=status.HTTP_202_ACCEPTED)
    async def submit(body: GreetingInput) -> dict[str, str]:
        return {"task_id": str(uuid.uuid4()), "name": body.name}

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(app: FastAPI, *, port: int) -> None:
    """Serve ``app`` as ``python -m api`` serves ours: one uvicorn process, its defaults
    (uvloop and httptools when installed), no log config, no server header."""
    uvicorn.run(app, host="127.0.0.1", port=port, log_config=None, server_header=False)


def main() -> None:
    serve(create_app(), port=int(sys.argv[1]))


if __name__ == "__main__":
    main()
