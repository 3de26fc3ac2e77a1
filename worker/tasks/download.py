"""download: fetch a URL with the worker's guarded client and report its digest.

Redirects are followed here, not by httpx, so each hop's scheme is checked and counted,
and each hop to a new host meets that host's ``host:`` limit (see worker.hop_limits);
each hop's address is checked by the client's network backend (see worker.netguard).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx
from pydantic import BaseModel

from throttler.catalog import DOWNLOAD, DownloadInput
from throttler.hosts import url_host_key
from worker.hop_limits import HopLimits
from worker.taskkit import Backpressure, PermanentError, Resources, RetriableError, RetriableTask
from worker.taskkit.errors import ScopePaused

ALLOWED_SCHEMES = frozenset({"http", "https"})
# Ask for the stored bytes: the digest and the size cap then apply to what the server
# holds, and no decompression can inflate a small response past the cap.
REQUEST_HEADERS = {"Accept-Encoding": "identity"}
# The answers by which a server asks to be left alone for a while (Retry-After).
PUSH_BACK_STATUSES = frozenset({429, 503})


class DownloadOutput(BaseModel):
    url: str
    status_code: int
    content_type: str | None
    content_length: int
    sha256: str


class Download(RetriableTask[DownloadInput, DownloadOutput], spec=DOWNLOAD):
    """Fetch the URL (GET, redirects followed and checked) and hash its body."""

    output_model = DownloadOutput

    async def run(self, resources: Resources, params: DownloadInput) -> DownloadOutput:
        settings = resources.settings
        deadline_s = asyncio.get_running_loop().time() + settings.download_timeout_s
        try:
            async with asyncio.timeout_at(deadline_s):
                return await fetch(
                    resources.http,
                    params.url,
                    max_bytes=settings.download_max_bytes,
                    max_redirects=settings.download_max_redirects,
                    hops=resources.hops,
                    deadline_s=deadline_s,
                )
        except TimeoutError as error:
            raise RetriableError(
                f"download did not finish within {settings.download_timeout_s:g}s"
            ) from error


async def fetch(
    client: httpx.AsyncClient,
    url: str,
    *,
    max_bytes: int,
    max_redirects: int,
    hops: HopLimits,
    deadline_s: float,
) -> DownloadOutput:
    """GET ``url`` following up to ``max_redirects`` redirects; read at most ``max_bytes``.

    Each redirect hop first satisfies its host's ``host:`` limit (worker.hop_limits),
    waiting for a token no later than ``deadline_s`` (event loop time).
    """
    loop = asyncio.get_running_loop()
    target = httpx.URL(url)
    # The relay released this task under its own host's limit (tasks.host, the same key).
    try:
        paid = {url_host_key(target)}
    except ValueError as error:
        raise PermanentError(f"URL host is not valid: {error}") from None
    await _check_not_paused(hops, next(iter(paid)), url=url)
    for hop in range(max_redirects + 1):
        if target.scheme not in ALLOWED_SCHEMES:
            raise PermanentError(f"refused {target}: only http and https URLs are fetched")
        if hop:
            await hops.before_hop(target, paid=paid, time_left_s=deadline_s - loop.time())
        try:
            async with client.stream("GET", target, headers=REQUEST_HEADERS) as response:
                if response.has_redirect_location:
                    target = _redirect_target(target, response.headers["Location"])
                    continue
                _check_status(response)
                return await _read_body(response, max_bytes=max_bytes)
        except httpx.TransportError as error:
            raise RetriableError(f"network error fetching {target}: {_describe(error)}") from error
    raise PermanentError(f"too many redirects: more than {max_redirects} from {url}")


async def _check_not_paused(hops: HopLimits, key: str, *, url: str) -> None:
    """Raise ScopePaused when the task's own host is paused: it was released before the
    pause (a push-back by another download, or the API), and must not reach the host
    during it. It runs again after the pause, without spending a try."""
    until = await hops.paused_until(key)
    if until is not None:
        raise ScopePaused(
            f"host:{key}",
            retry_after_s=(until - datetime.now(UTC)).total_seconds(),
            detail=f"host {key} is paused until {until.isoformat()}; not fetched {url}",
        )


def _redirect_target(current: httpx.URL, location: str) -> httpx.URL:
    try:
        return current.join(location)
    except httpx.InvalidURL as error:
        raise PermanentError(f"invalid redirect Location {location!r} from {current}") from error


def _describe(error: Exception) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def retry_after_s(value: str | None, *, now: datetime) -> float:
    """Seconds a Retry-After header asks for: delta-seconds or an HTTP-date (RFC 9110
    10.2.3); NaN when missing or invalid (the caller's default applies: the worker's
    UPSTREAM_DEFAULT_PAUSE_S). A date in the past asks for 0."""
    text = (value or "").strip()
    if text.isdigit():
        return float(text)
    if not text:
        return math.nan
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return math.nan
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)  # HTTP-dates are GMT
    return max((moment - now).total_seconds(), 0.0)


def _check_status(response: httpx.Response) -> None:
    status = response.status_code
    if 200 <= status < 300:
        return
    if status in PUSH_BACK_STATUSES:
        # Too many requests, or unavailable for now: pause the host's scope (every
        # relay stops releasing its downloads) and run this one again after the pause,
        # without spending a try (worker.taskkit.backpressure).
        raise Backpressure(
            f"host:{url_host_key(response.url)}",
            retry_after_s=retry_after_s(response.headers.get("Retry-After"), now=datetime.now(UTC)),
            detail=f"HTTP {status} from {response.url}",
        )
    if 500 <= status < 600:
        raise RetriableError(f"HTTP {status} from {response.url}")
    # 4xx, and anything else a GET should not get (e.g. 304 or a 3xx without Location).
    raise PermanentError(f"HTTP {status} from {response.url}")


async def _read_body(response: httpx.Response, *, max_bytes: int) -> DownloadOutput:
    too_big = f"response body exceeds DOWNLOAD_MAX_BYTES ({max_bytes} bytes)"
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PermanentError(f"{too_big}: Content-Length is {declared}")
    digest = hashlib.sha256()
    size = 0
    async for chunk in response.aiter_raw():
        size += len(chunk)
        if size > max_bytes:
            raise PermanentError(too_big)
        digest.update(chunk)
    return DownloadOutput(
        url=str(response.url),
        status_code=response.status_code,
        content_type=response.headers.get("Content-Type"),
        content_length=size,
        sha256=digest.hexdigest(),
    )
