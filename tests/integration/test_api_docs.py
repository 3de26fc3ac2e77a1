"""/docs and /redoc load nothing from another origin; API_DOCS decides who may read them."""

from __future__ import annotations

import base64
import shutil
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from api.docs import DOCS_URL, OAUTH2_REDIRECT_URL, OPENAPI_URL, REDOC_URL
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
    "basic-malformed": ({"Authorization": "Basic %%%"}, False),
}


class _References(HTMLParser):
    """Collect every URL a page makes the browser load: src, href and ReDoc's spec-url."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [value for name, value in attrs if name in {"src", "href", "spec-url"} and value]


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
    settings = Settings(
        database_url=base_settings.database_url,
        redis_url=base_settings.redis_url,
        api_keys=API_KEYS if with_keys else "",
        api_docs=api_docs,
    )
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
    settings = Settings(
        database_url=base_settings.database_url, redis_url=base_settings.redis_url, api_keys=API_KEYS
    )
    async with make_api_client(settings) as client:
        # A Basic pair the browser replays after the docs prompt is not an API key.
        submitted = await client.post(
            "/api/v1/task/greeting", json={"name": "Ada"}, headers=_basic("", KEY)
        )
        assert submitted.status_code == 401
        assert submitted.headers["www-authenticate"] == "Bearer"
        # Probes never ask for a key.
        assert (await client.get("/healthz")).status_code == 200
