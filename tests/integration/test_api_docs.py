"""/docs and /redoc load nothing from another origin; API_DOCS decides who may read them.

The pages are checked twice: their HTML and assets over HTTP, and rendered by a real headless
Chromium (Debian's, driven by Playwright: no browser download) with every request that is
not for the API recorded and aborted, so a page that still needs a CDN renders nothing and
the recorded request names it.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from playwright.async_api import Browser, Page, Request, Response, Route, async_playwright
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from api.app import create_app
from api.docs import DOCS_URL, OAUTH2_REDIRECT_URL, OPENAPI_URL, REDOC_URL
from tests.support import wait_for
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory

KEY = "docs-key-0123456789"
OTHER_KEY = "docs-key-of-account-b"
API_KEYS = f"{KEY}:account-a,{OTHER_KEY}:account-b"
# Hosts the stock FastAPI pages load from, and the one the stock ReDoc bundle takes its
# logo from: none may appear in the pages or in the assets served.
EXTERNAL_HOSTS = ("cdn.jsdelivr.net", "fonts.googleapis.com", "fonts.gstatic.com", "cdn.redoc.ly")
# What a referenced asset must be served as, and a size only the real file reaches.
ASSET_KINDS = {
    ".js": ("text/javascript", 100_000),
    ".css": ("text/css", 10_000),
    ".png": ("image/png", 1_000),
}
# Every path of the docs: the pages, the schema, the OAuth2 redirect and the assets.
DOCS_PATHS = [
    OPENAPI_URL,
    DOCS_URL,
    REDOC_URL,
    OAUTH2_REDIRECT_URL,
    "/docs/swagger-ui-bundle.js",
    "/docs/swagger-ui.css",
    "/docs/fastapi/favicon.png",
    "/redoc/redoc.standalone.js",
    "/redoc/logo-mini.svg",
]


def _basic(user: str, password: str) -> dict[str, str]:
    pair = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {pair}"}


# Name -> (headers, whether a protected page lets them in).
CREDENTIALS: dict[str, tuple[dict[str, str], bool]] = {
    "none": ({}, False),
    "basic": (_basic("", KEY), True),
    "basic-any-user": (_basic("someone", OTHER_KEY), True),
    "bearer": ({"Authorization": f"Bearer {KEY}"}, True),
    "basic-wrong": (_basic("", KEY + "x"), False),
    "basic-key-as-user": (_basic(KEY, ""), False),
    "bearer-wrong": ({"Authorization": "Bearer nope"}, False),
    "other-scheme": ({"Authorization": f"Token {KEY}"}, False),
    "basic-malformed": ({"Authorization": "Basic %%%"}, False),
}


class _References(HTMLParser):
    """Collect every URL a page makes the browser load: src, href and ReDoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [
            value for name, value in attrs if name in {"src", "href", "spec-url"} and value
        ]


def _references(page: str) -> list[str]:
    parser = _References()
    parser.feed(page)
    return parser.urls


@pytest.fixture
def base_settings(tmp_path: Path, sqlite_template: Path, redis_url: str) -> Settings:
    """Settings on a private SQLite database: the docs do not depend on the database kind."""
    path = tmp_path / "docs.db"
    shutil.copyfile(sqlite_template, path)
    return Settings(database_url=f"sqlite+aiosqlite:///{path}", redis_url=redis_url)


def _with(base: Settings, *, api_keys: str, api_docs: str | None = None) -> Settings:
    return Settings(
        database_url=base.database_url,
        redis_url=base.redis_url,
        api_keys=api_keys,
        api_docs=api_docs,
    )


@pytest.fixture
async def docs_client(
    base_settings: Settings, make_api_client: ApiClientFactory
) -> AsyncIterator[httpx.AsyncClient]:
    async with make_api_client(base_settings) as client:
        yield client


@pytest.mark.parametrize("page", [DOCS_URL, REDOC_URL])
async def test_docs_page_loads_only_same_origin_assets_the_api_serves(
    docs_client: httpx.AsyncClient, page: str
) -> None:
    response = await docs_client.get(page)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    for host in EXTERNAL_HOSTS:
        assert host not in response.text
    assert "://" not in response.text, "an absolute URL: the page loads from elsewhere"
    references = _references(response.text)
    assert any(url.endswith(".js") for url in references), references
    for reference in references:
        url = response.url.join(reference)
        assert (url.scheme, url.host, url.port) == (
            response.url.scheme,
            response.url.host,
            response.url.port,
        ), f"{reference} is not on the API's origin"
        asset = await docs_client.get(url)
        assert asset.status_code == 200, reference
        if url.path == OPENAPI_URL:
            assert asset.json()["paths"]
            continue
        content_type, min_bytes = ASSET_KINDS[Path(url.path).suffix]
        assert asset.headers["content-type"].startswith(content_type), reference
        assert len(asset.content) >= min_bytes, reference
        for host in EXTERNAL_HOSTS:
            assert host.encode() not in asset.content, f"{reference} loads from {host}"


async def test_swagger_ui_page_links_its_stylesheet_and_the_schema(
    docs_client: httpx.AsyncClient,
) -> None:
    page = (await docs_client.get(DOCS_URL)).text

    assert "/docs/swagger-ui.css" in _references(page)
    assert f"url: '{OPENAPI_URL}'" in page
    assert f"'{OAUTH2_REDIRECT_URL}'" in page


@pytest.mark.parametrize(
    ("with_keys", "api_docs", "access"),
    [
        (False, None, "public"),
        (True, None, "protected"),
        (False, "public", "public"),
        (True, "public", "public"),
        (True, "protected", "protected"),
        (False, "off", "off"),
        (True, "off", "off"),
    ],
    ids=lambda value: {True: "keys", False: "no-keys", None: "default"}.get(value, value),
)
async def test_api_docs_setting_covers_every_docs_path(
    base_settings: Settings,
    make_api_client: ApiClientFactory,
    with_keys: bool,
    api_docs: str | None,
    access: str,
) -> None:
    settings = _with(base_settings, api_keys=API_KEYS if with_keys else "", api_docs=api_docs)
    assert settings.docs_access == access

    outcomes: dict[tuple[str, str], tuple[int, str | None]] = {}
    async with make_api_client(settings) as client:
        for path in DOCS_PATHS:
            for name, (headers, _) in CREDENTIALS.items():
                response = await client.get(path, headers=headers)
                outcomes[path, name] = (
                    response.status_code,
                    response.headers.get("www-authenticate"),
                )

    challenge = 'Basic realm="API docs"'
    for (path, name), (status, authenticate) in outcomes.items():
        where = f"{path} with {name} credentials"
        if access == "off":
            assert status == 404, where
        elif access == "public" or CREDENTIALS[name][1]:
            assert status == 200, where
        else:
            assert status == 401, where
            # A browser answers this challenge with a login prompt: the key as password.
            assert authenticate is not None, where
            assert authenticate.startswith(challenge), where


async def test_protected_docs_leave_the_api_key_rules_unchanged(
    base_settings: Settings, make_api_client: ApiClientFactory
) -> None:
    settings = _with(base_settings, api_keys=API_KEYS)
    async with make_api_client(settings) as client:
        # A Basic pair the browser replays after the docs prompt is not an API key.
        submitted = await client.post(
            "/api/v1/task/greeting", json={"name": "Ada"}, headers=_basic("", KEY)
        )
        assert submitted.status_code == 401
        assert submitted.headers["www-authenticate"] == "Bearer"
        # Probes never ask for a key.
        assert (await client.get("/healthz")).status_code == 200


# --- in a real browser --------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no {CHROMIUM}: `apt-get install chromium` to render the docs in a real browser",
)
# Generous: parsing the 1.5 MB Swagger UI bundle takes seconds on a loaded machine.
RENDER_TIMEOUT_MS = 30_000
# Operations every rendering must show (the schema has more).
OPERATIONS = ("/api/v1/task/greeting", "/api/v1/task/result/{task_id}", "/healthz")


@dataclass
class Traffic:
    """What a page asked for: requests to other origins (all aborted), and local failures."""

    api_origin: str
    external: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def is_local(self, url: str) -> bool:
        parts = urlsplit(url)
        return f"{parts.scheme}://{parts.netloc}" == self.api_origin

    async def route(self, route: Route) -> None:
        if self.is_local(route.request.url):
            await route.continue_()
        else:
            self.external.append(route.request.url)
            await route.abort("internetdisconnected")

    def on_response(self, response: Response) -> None:
        if self.is_local(response.url) and response.status >= 400:
            self.failures.append(f"{response.status} {response.url}")

    def on_failed(self, request: Request) -> None:
        if self.is_local(request.url):
            self.failures.append(f"{request.failure} {request.url}")


@asynccontextmanager
async def _served(settings: Settings) -> AsyncIterator[str]:
    """Serve the app with uvicorn on a free local port, as `python -m api` does: its origin."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        serving = asyncio.create_task(server.serve(sockets=[listener]))

        async def started() -> bool:
            if serving.done():
                serving.result()  # raises what stopped the server
                raise AssertionError("uvicorn stopped before it started")
            return server.started

        try:
            await wait_for(started, timeout_s=30, message="uvicorn to listen")
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await serving


@asynccontextmanager
async def _chromium() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def _watched_page(
    browser: Browser, origin: str, *, credentials: tuple[str, str] | None = None
) -> tuple[Page, Traffic]:
    context = await browser.new_context(
        http_credentials=(
            {"username": credentials[0], "password": credentials[1]} if credentials else None
        ),
    )
    traffic = Traffic(api_origin=origin)
    await context.route("**/*", traffic.route)
    page = await context.new_page()
    page.on("response", traffic.on_response)
    page.on("requestfailed", traffic.on_failed)
    return page, traffic


async def _rendered(page: Page, traffic: Traffic, url: str, selector: str) -> None:
    """Open ``url`` and wait for ``selector``; on a blank page, say what the page asked for."""
    await page.goto(url)
    try:
        await page.locator(selector).first.wait_for(timeout=RENDER_TIMEOUT_MS)
    except PlaywrightTimeoutError:
        raise AssertionError(
            f"{url} rendered no {selector}; asked other origins for {traffic.external}, "
            f"failed locally: {traffic.failures}"
        ) from None


async def _swagger_operations(page: Page, traffic: Traffic) -> list[str]:
    """Open /docs and return the path of each operation Swagger UI lists."""
    await _rendered(page, traffic, traffic.api_origin + DOCS_URL, ".opblock-summary-path")
    paths: list[str] = await page.locator(".opblock-summary-path").evaluate_all(
        "els => els.map(e => e.dataset.path)"
    )
    return paths


@needs_chromium
async def test_swagger_ui_and_redoc_render_with_no_internet(base_settings: Settings) -> None:
    async with _served(base_settings) as origin, _chromium() as browser:
        page, traffic = await _watched_page(browser, origin)

        operations = await _swagger_operations(page, traffic)
        assert set(OPERATIONS) <= set(operations), operations

        # ReDoc's side menu lists the tags once the schema is rendered.
        await _rendered(page, traffic, origin + REDOC_URL, "[data-item-id^='tag/']")
        rendered = await page.content()
        assert all(operation in rendered for operation in OPERATIONS)

    assert traffic.external == [], "the docs asked the internet"
    assert traffic.failures == []


@needs_chromium
async def test_protected_docs_render_after_the_browser_login_with_a_key(
    base_settings: Settings,
) -> None:
    # API_DOCS unset: with API_KEYS the docs need a key, which a browser gives at its prompt.
    keyed = _with(base_settings, api_keys=API_KEYS)
    async with _served(keyed) as origin, _chromium() as browser:
        # No login: the browser's prompt goes unanswered (headless) and the page fails.
        anonymous, _ = await _watched_page(browser, origin)
        with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
            await anonymous.goto(origin + DOCS_URL)
        # A login with a wrong key: the browser tries it and shows the 401.
        wrong, _ = await _watched_page(browser, origin, credentials=("", "not-a-key"))
        refused = await wrong.goto(origin + DOCS_URL)
        assert refused is not None
        assert refused.status == 401

        # The page, the schema Swagger UI fetches and every asset pass with the login.
        page, traffic = await _watched_page(browser, origin, credentials=("", KEY))
        operations = await _swagger_operations(page, traffic)
        assert set(OPERATIONS) <= set(operations), operations

    assert traffic.external == []
    assert traffic.failures == []
