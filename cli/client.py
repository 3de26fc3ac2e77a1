"""One HTTP client for every command: the base URL, the key, and errors as exit codes."""

from __future__ import annotations

from typing import Any

import click
import httpx

API = "/api/v1"


class ApiError(click.ClickException):
    """An HTTP error or an unreachable API: printed as one line, exit code 2."""

    exit_code = 2


def headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def detail(response: httpx.Response) -> str:
    """The API's own ``detail`` (a 422's field locations included), else the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    found = body.get("detail", body) if isinstance(body, dict) else body
    if isinstance(found, list):
        return "; ".join(
            f"{'.'.join(str(part) for part in item.get('loc', []))}: {item.get('msg')}"
            for item in found
            if isinstance(item, dict)
        )
    return str(found)


class Client:
    def __init__(self, url: str, key: str | None, *, timeout_s: float = 40.0) -> None:
        self.url = url.rstrip("/")
        self.http = httpx.Client(base_url=self.url + API, headers=headers(key), timeout=timeout_s)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise ApiError(f"cannot reach the API at {self.url}: {error}") from error
        if response.status_code >= 400:
            raise ApiError(f"{method} {path}: HTTP {response.status_code}: {detail(response)}")
        if response.status_code == 204 or not response.content:
            return None
        return response.json()
