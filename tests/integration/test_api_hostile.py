"""Hostile requests: every one gets a 4xx (never a 5xx), and nothing is written."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from api.app import create_app
from api.strict_json import MAX_JSON_DEPTH, StrictJSONRoute, parse_strict_json
from throttler.catalog import DownloadInput
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import RowCounter

NOTHING_WRITTEN = {"tasks": 0, "outbox": 0, "task_events": 0}
API = "/api/v1"
GREETING = "/api/v1/task/greeting"
DOWNLOAD = "/api/v1/task/download"
BLOCKING = "/api/v1/task/blocking_long_running_task"
JSON = "application/json"


def _url(url: str) -> bytes:
    return json.dumps({"url": url}).encode()


# (id, path, raw body, content type, expected status)
HOSTILE: list[tuple[str, str, bytes, str | None, int]] = [
    # Size and shape
    ("huge-string", GREETING, b'{"name": "' + b"x" * 60_000 + b'"}', JSON, 422),
    ("over-body-limit", GREETING, b'{"name": "' + b"x" * 70_000 + b'"}', JSON, 413),
    ("deep-arrays-10k", GREETING, b"[" * 10_000 + b"]" * 10_000, JSON, 422),
    ("deep-objects-10k", GREETING, b'{"a":' * 10_000 + b"1" + b"}" * 10_000, JSON, 422),
    ("deep-in-field", GREETING, b'{"name":' + b"[" * 40 + b"]" * 40 + b"}", JSON, 422),
    (
        "just-past-depth",
        GREETING,
        b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1),
        JSON,
        422,
    ),
    ("array-not-object", GREETING, b'[{"name": "Ada"}]', JSON, 422),
    ("number-not-object", BLOCKING, b"5", JSON, 422),
    ("many-keys", GREETING, json.dumps({f"k{i}": i for i in range(3000)}).encode(), JSON, 422),
    # Numbers JSON does not have, or Python would turn into something else
    ("nan", BLOCKING, b'{"duration": NaN}', JSON, 422),
    ("infinity", BLOCKING, b'{"duration": Infinity}', JSON, 422),
    ("minus-infinity", BLOCKING, b'{"duration": -Infinity}', JSON, 422),
    ("nan-in-string-field", GREETING, b'{"name": NaN}', JSON, 422),
    ("float-overflow", BLOCKING, b'{"duration": 1e400}', JSON, 422),
    ("int-5000-digits", BLOCKING, b'{"duration": 1' + b"0" * 5000 + b"}", JSON, 422),
    ("int-as-string", BLOCKING, b'{"duration": "5"}', JSON, 422),
    ("int-as-float", BLOCKING, b'{"duration": 5.0}', JSON, 422),
    ("int-as-bool", BLOCKING, b'{"duration": true}', JSON, 422),
    # Keys and strings
    ("duplicate-keys", GREETING, b'{"name": "Ada", "name": "Eve"}', JSON, 422),
    ("duplicate-unknown-keys", GREETING, b'{"name": "Ada", "x": 1, "x": 2}', JSON, 422),
    ("unknown-field", GREETING, b'{"name": "Ada", "priority": 9}', JSON, 422),
    ("escaped-null-byte", GREETING, b'{"name": "A\\u0000da"}', JSON, 422),
    ("raw-null-byte", GREETING, b'{"name": "A\x00da"}', JSON, 422),
    ("raw-control-char", GREETING, b'{"name": "A\x07da"}', JSON, 422),
    ("escaped-control-char", GREETING, b'{"name": "A\\u001bda"}', JSON, 422),
    ("bidi-override", GREETING, '{"name": "Ada\u202etxt.exe"}'.encode(), JSON, 422),
    ("lone-surrogate", GREETING, b'{"name": "\\ud800"}', JSON, 422),
    ("surrogate-in-key", GREETING, b'{"\\udfff": 1}', JSON, 422),
    ("name-201-chars", GREETING, json.dumps({"name": "x" * 201}).encode(), JSON, 422),
    # Encodings
    ("invalid-utf8", GREETING, b'{"name": "\xff\xfe"}', JSON, 422),
    ("overlong-utf8", GREETING, b'{"name": "\xc0\xaf"}', JSON, 422),
    ("utf16-body", GREETING, '{"name": "Ada"}'.encode("utf-16"), JSON, 422),
    ("utf8-bom", GREETING, b'\xef\xbb\xbf{"name": "Ada"}', JSON, 422),
    ("truncated", GREETING, b'{"name": "Ada"', JSON, 422),
    ("trailing-garbage", GREETING, b'{"name": "Ada"} x', JSON, 422),
    ("empty-body", GREETING, b"", JSON, 422),
    ("comment", GREETING, b'{"name": "Ada" /* hi */}', JSON, 422),
    ("single-quotes", GREETING, b"{'name': 'Ada'}", JSON, 422),
    # Content types
    ("text-plain", GREETING, b'{"name": "Ada"}', "text/plain", 422),
    ("form", GREETING, b"name=Ada", "application/x-www-form-urlencoded", 422),
    ("multipart", GREETING, b"--x\r\n\r\nAda\r\n--x--", "multipart/form-data; boundary=x", 422),
    ("xml", GREETING, b"<name>Ada</name>", "application/xml", 422),
    ("no-content-type-garbage", GREETING, b"\x00\x01\x02", None, 422),
    # URLs the parser or the worker would choke on, or that would dodge host: limits
    ("url-ipv6-unclosed", DOWNLOAD, _url("http://[::1/"), JSON, 422),
    ("url-ipv6-garbage", DOWNLOAD, _url("http://[zz]/"), JSON, 422),
    ("url-ipv6-triple-colon", DOWNLOAD, _url("http://[:::1]/"), JSON, 422),
    ("url-ipv6-zone-id", DOWNLOAD, _url("http://[fe80::1%25eth0]/"), JSON, 422),
    ("url-port-too-big", DOWNLOAD, _url("http://example.com:99999/"), JSON, 422),
    ("url-port-alpha", DOWNLOAD, _url("http://example.com:http/"), JSON, 422),
    ("url-port-negative", DOWNLOAD, _url("http://example.com:-1/"), JSON, 422),
    ("url-newline-in-host", DOWNLOAD, _url("http://exa\nmple.com/"), JSON, 422),
    ("url-crlf-in-path", DOWNLOAD, _url("http://example.com/\r\nX-Injected: 1"), JSON, 422),
    ("url-space-in-host", DOWNLOAD, _url("http://exa mple.com/"), JSON, 422),
    ("url-tab", DOWNLOAD, _url("http://example.com/\t"), JSON, 422),
    ("url-null", DOWNLOAD, _url("http://example.com/\x00"), JSON, 422),
    ("url-bidi", DOWNLOAD, _url("http://example.com/\u202egpj.exe"), JSON, 422),
    ("url-zero-width", DOWNLOAD, _url("http://exam\u200bple.com/"), JSON, 422),
    ("url-fullwidth-host", DOWNLOAD, _url("http://\uff45xample.com/"), JSON, 422),
    ("url-host-too-long", DOWNLOAD, _url("http://" + "a." * 130 + "com/"), JSON, 422),
    ("url-label-too-long", DOWNLOAD, _url("http://" + "a" * 64 + ".com/"), JSON, 422),
    ("url-empty-label", DOWNLOAD, _url("http://a..com/"), JSON, 422),
    ("url-backslashes", DOWNLOAD, _url("http:\\\\example.com\\"), JSON, 422),
    ("url-scheme-only", DOWNLOAD, _url("https:"), JSON, 422),
    ("url-data", DOWNLOAD, _url("data:text/plain,hi"), JSON, 422),
    ("url-gopher", DOWNLOAD, _url("gopher://example.com/"), JSON, 422),
    ("url-not-a-string", DOWNLOAD, b'{"url": {"host": "example.com"}}', JSON, 422),
]


@pytest.mark.parametrize(
    ("path", "body", "content_type", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in HOSTILE],
)
async def test_hostile_body_is_rejected_and_nothing_written(
    api_client: httpx.AsyncClient,
    row_counts: RowCounter,
    path: str,
    body: bytes,
    content_type: str | None,
    expected: int,
) -> None:
    headers = {} if content_type is None else {"content-type": content_type}
    response = await api_client.post(path, content=body, headers=headers)

    assert response.status_code == expected, response.text
    assert response.json()["detail"]
    assert await row_counts() == NOTHING_WRITTEN


# (id, method, raw path with query)
HOSTILE_URLS: list[tuple[str, str, str]] = [
    ("result-null-byte", "GET", "/api/v1/task/result/%00"),
    ("result-invalid-utf8", "GET", "/api/v1/task/result/%ff%fe"),
    ("result-overlong-utf8", "GET", "/api/v1/task/result/%c0%af"),
    ("result-bidi", "GET", "/api/v1/task/result/%E2%80%AEabc"),
    ("result-emoji", "GET", "/api/v1/task/result/%F0%9F%98%80"),
    ("result-traversal", "GET", "/api/v1/task/result/..%2f..%2fetc%2fpasswd"),
    ("result-dot-dot", "GET", "/api/v1/task/result/../../openapi.json/x"),
    ("result-5000-chars", "GET", "/api/v1/task/result/" + "a" * 5000),
    ("result-sql", "GET", "/api/v1/task/result/'%20OR%201=1--"),
    ("result-percent-literal", "GET", "/api/v1/task/result/%25"),
    ("task-name-homoglyph", "POST", "/api/v1/task/gr%D0%B5eting"),
    ("task-name-fullwidth", "POST", "/api/v1/task/%EF%BD%87reeting"),
    ("task-name-null", "POST", "/api/v1/task/greeting%00"),
    ("priority-null", "POST", GREETING + "?priority=%00"),
    ("priority-huge", "POST", GREETING + "?priority=" + "9" * 5000),
    ("priority-fullwidth-digit", "POST", GREETING + "?priority=%EF%BC%95"),
    ("priority-fraction", "POST", GREETING + "?priority=5.5"),
    ("priority-nan", "POST", GREETING + "?priority=NaN"),
    ("delay-infinity", "POST", GREETING + "?delay_s=Infinity"),
    ("delay-negative", "POST", GREETING + "?delay_s=-1"),
    ("run-at-garbage", "POST", GREETING + "?run_at=9999-99-99"),
    ("run-at-far-future", "POST", GREETING + "?run_at=9999-12-31T23:59:59-14:00"),
    ("run-at-naive", "POST", GREETING + "?run_at=2030-01-01T00:00:00"),
    ("both-delay-and-run-at", "POST", GREETING + "?delay_s=1&run_at=2030-01-01T00:00:00Z"),
    ("unknown-query", "POST", GREETING + "?delay=30"),
    ("query-null-name", "POST", GREETING + "?%00=1"),
]


@pytest.mark.parametrize(
    ("method", "path"), [pytest.param(*case[1:], id=case[0]) for case in HOSTILE_URLS]
)
async def test_hostile_url_is_rejected_and_nothing_written(
    api_client: httpx.AsyncClient, row_counts: RowCounter, method: str, path: str
) -> None:
    response = await api_client.request(method, path, json={"name": "Ada"})

    assert 400 <= response.status_code < 500, response.text
    assert await row_counts() == NOTHING_WRITTEN


@pytest.mark.parametrize(
    ("url", "host"),
    [
        ("http://EXAMPLE.com./x", "example.com"),
        ("https://b\u00fccher.example/", "xn--bcher-kva.example"),
        ("http://[::1]:8080/", "[::1]"),
        ("http://0x7f000001/", "127.0.0.1"),
        ("http://user:pw@Example.COM:81/", "example.com"),
    ],
)
def test_host_limits_key_on_the_host_the_client_contacts(url: str, host: str) -> None:
    # Spelling a host differently must not escape a host: limit.
    assert DownloadInput(url=url).limit_host() == host


def test_strict_parser_accepts_ordinary_json() -> None:
    document = {"name": "Ad\u00e1 \U0001f600", "n": [1, 2.5, None, True], "o": {"k": "v"}}
    assert parse_strict_json(json.dumps(document).encode()) == document
    assert parse_strict_json(json.dumps(document, ensure_ascii=False).encode()) == document
    nested: list[object] = []
    for _ in range(MAX_JSON_DEPTH - 1):
        nested = [nested]
    assert parse_strict_json(json.dumps(nested).encode()) == nested


def _api_routes(routes: Sequence[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # FastAPI keeps an included router's own routes behind a wrapper.
        elif (included := getattr(route, "original_router", None)) is not None:
            yield from _api_routes(included.routes)


def test_every_route_with_a_body_parses_it_strictly(settings: Settings) -> None:
    # A router made without StrictJSONRoute answers a malformed body with FastAPI's 400 and
    # takes duplicate keys and NaN: every route that reads a body must parse it strictly.
    routes = list(_api_routes(create_app(settings).routes))
    with_body = [route for route in routes if route.body_field is not None]
    assert {route.path for route in with_body} >= {API + "/tasks", API + "/limits/{scope}"}
    assert [r.path for r in with_body if not isinstance(r, StrictJSONRoute)] == []
