"""Map a database that cannot answer to 503 with Retry-After, never a 500 with a traceback."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from api.intake import IntakeClosedError
from throttler.errors import is_transient_db_error
from throttler.logs import fields

log = logging.getLogger(__name__)

# Seconds a client should wait before retrying; the database is usually back quickly
# (a lock released, a failover done), and a short wait spreads retries out.
RETRY_AFTER_S = 2


def _describe(error: Exception) -> str:
    # The driver's own error, on one line: SQLAlchemy's text adds the SQL and parameters,
    # which would split the log line and may carry client data.
    cause = error.orig if isinstance(error, DBAPIError) and error.orig is not None else error
    return " ".join(f"{type(cause).__name__}: {cause}".split())[:300]


def _unavailable(request: Request, error: Exception) -> JSONResponse:
    log.warning("db.unavailable", extra=fields(path=request.url.path, error=_describe(error)))
    return JSONResponse(
        {"detail": "database unavailable, retry later"},
        status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


async def _on_dbapi_error(request: Request, error: Exception) -> JSONResponse:
    # Our SQL or data is wrong, not the database's state: a 503 would invite retries that
    # can never succeed. Everything else (connection lost, locked, disk full, read-only,
    # privileges revoked, too many connections, shutting down) is the environment's:
    # throttler.errors judges by the driver's code.
    if not is_transient_db_error(error):
        log.error("db.error", exc_info=error, extra=fields(path=request.url.path))
        return JSONResponse(
            {"detail": "internal error"}, status_code=status.HTTP_500_INTERNAL_SERVER_ERROR
        )
    return _unavailable(request, error)


async def _on_unreachable(request: Request, error: Exception) -> JSONResponse:
    # Pool exhausted, or the connect itself failed (refused, timed out): a driver may
    # raise these as OSError / TimeoutError, outside SQLAlchemy's wrapping.
    return _unavailable(request, error)


def _renderable(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """FastAPI's error items, without echoed input JSON cannot carry (NaN, surrogates)."""
    try:
        JSONResponse(errors)
    except (ValueError, UnicodeEncodeError):
        return [{k: v for k, v in item.items() if k not in ("input", "ctx")} for item in errors]
    return errors


async def _on_validation_error(_request: Request, error: Exception) -> JSONResponse:
    # FastAPI's own handler echoes each offending input; one that JSON cannot encode
    # would turn the 422 into a 500.
    assert isinstance(error, RequestValidationError)
    errors = jsonable_encoder(error.errors())
    return JSONResponse(
        {"detail": _renderable(errors)}, status_code=status.HTTP_422_UNPROCESSABLE_CONTENT
    )


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(DBAPIError, _on_dbapi_error)
    app.add_exception_handler(PoolTimeoutError, _on_unreachable)
    # TimeoutError and ConnectionRefusedError are both OSError subclasses.
    app.add_exception_handler(OSError, _on_unreachable)
    # A submission arriving while the API shuts down: not written, so retry elsewhere.
    app.add_exception_handler(IntakeClosedError, _on_unreachable)
