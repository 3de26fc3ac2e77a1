"""/dashboard in a real headless Chromium against real api, relay and worker processes.

Every request the page makes is routed through the test: one for a host other than
127.0.0.1 is recorded and aborted, and the test fails on it. The first test drives what an
operator does (a task appears and finishes, a pause makes tasks wait with the reason
shown, cancel, retry, resume) and takes the screenshot the README shows: set
``DASHBOARD_SCREENSHOT=docs/dashboard.png`` to write it there (else it goes to tmp).
The second runs with API_KEYS: the page asks for a key once, keeps it across a reload,
sends it with every call, and shows a refused key (401) and a refused action (403).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from devtools.redis_server import free_port
from tests.acceptance.processes import Cluster, cluster
from tests.support import wait_for

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT_ENV = "DASHBOARD_SCREENSHOT"
API = "/api/v1"
KEY = "browser-key-ops-0123456789"
PLAIN_KEY = "browser-key-plain-0123456789"
# Generous: the machine running the suite is shared.
UI_TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"no {CHROMIUM}: `apt-get install chromium` to test the dashboard in a browser",
    ),
    # The page reads no database itself: one database kind is enough here.
    pytest.mark.parametrize("database_url", ["sqlite"], indirect=True),
]


@dataclass
class Requests:
    """Every request the page made; any to a host other than 127.0.0.1 is aborted."""

    external: list[str] = field(default_factory=list)
    api_calls: list[tuple[str, str | None]] = field(default_factory=list)

    async def route(self, route: Route) -> None:
        request = route.request
        if urlsplit(request.url).hostname != "127.0.0.1":
            self.external.append(request.url)
            await route.abort("internetdisconnected")
            return
        if urlsplit(request.url).path.startswith(API):
            self.api_calls.append((request.url, await request.header_value("authorization")))
        await route.continue_()


@asynccontextmanager
async def _browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            await browser.close()


async def _page(browser: Browser, requests: Requests) -> Page:
    context = await browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    expect.set_options(timeout=UI_TIMEOUT_MS)
    await context.route("**/*", requests.route)
    return await context.new_page()


def _env(database_url: str, redis_url: str, port: int, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "API_KEYS": "",
        "RELAY_LIMITS": "task:greeting rate=4/s; host:* rate=2/s inflight=2",
        "RELAY_RATE": "0",
        "RELAY_MAX_INFLIGHT": "0",
        "METRICS_REFRESH_S": "1",
        "LOG_LEVEL": "WARNING",
        **extra,
    }


async def _api_up(client: httpx.AsyncClient, running: Cluster) -> None:
    async def healthy() -> bool:
        for component in running.components:
            assert component.process.poll() is None, component.output()[-3000:]
        try:
            return (await client.get("/healthz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(healthy, timeout_s=30, interval_s=0.1, message="the API up")


async def _submit(client: httpx.AsyncClient, name: str, body: dict[str, Any]) -> str:
    response = await client.post(f"{API}/task/{name}", json=body)
    assert response.status_code == 202, response.text
    task_id: str = response.json()["task_id"]
    return task_id


async def _show(page: Page, task_id: str) -> None:
    await page.fill("#task-id", task_id)
    await page.click("#id-form button")
    await expect(page.locator("#task-title")).to_have_text(task_id)


async def test_an_operator_watches_pauses_cancels_and_retries(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    requests = Requests()
    env = _env(database_url, redis_url, port)
    with cluster(env=env, log_dir=tmp_path) as running:
        for module in ("api", "relay", "worker"):
            running.start(module)
        async with (
            httpx.AsyncClient(base_url=origin, timeout=10) as client,
            _browser() as browser,
        ):
            await _api_up(client, running)
            page = await _page(browser, requests)
            await page.goto(f"{origin}/dashboard")
            await expect(page.locator("html[data-live='1']")).to_have_count(1)
            await expect(page.locator("#key-form")).to_be_hidden()
            # Both live nodes are listed.
            await expect(page.locator("#nodes tbody tr")).to_have_count(2)

            # A task appears and finishes, with its timeline; a batch feeds the chart.
            batch = [{"name": "greeting", "input": {"name": f"n{i}"}} for i in range(24)]
            assert (await client.post(f"{API}/tasks", json={"tasks": batch})).status_code == 202
            ada = await _submit(client, "greeting", {"name": "Ada"})
            await _show(page, ada)
            await expect(page.locator("#task-status")).to_have_text("succeeded")
            await expect(page.locator("#task-events li")).to_have_count(4)
            assert await page.locator("#task-events li").evaluate_all(
                "items => items.map(i => i.dataset.event)"
            ) == ["submitted", "queued", "started", "succeeded"]
            await expect(page.locator("#count-succeeded b")).to_have_text("25")
            chart = page.locator(".chart[data-scope='task:greeting']")
            await expect(chart).to_contain_text("cap 4/s")

            # A download the worker refuses (a loopback address): a failure with its error.
            refused = await _submit(client, "download", {"url": "http://127.0.0.1:9/"})
            failure = page.locator(f"#failures a[data-task='{refused}']")
            await expect(failure).to_have_count(1)

            # Pause greetings from the page: a new greeting waits, and says why.
            await page.fill("#pause-scope", "task:greeting")
            await page.fill("#pause-seconds", "600")
            await page.click("#pause-form button")
            paused = page.locator("#paused li[data-scope='task:greeting']")
            await expect(paused).to_have_count(1)
            held = await _submit(client, "greeting", {"name": "Held"})
            await _show(page, held)
            await expect(page.locator("#task-status")).to_have_text("pending")
            await expect(page.locator("#task-waiting")).to_contain_text(
                "waiting: paused (task:greeting) until"
            )
            # The search lists it with its reason too.
            await page.select_option("#filter-status", "pending")
            await page.click("#filter-form button")
            await expect(page.locator("#results tbody tr")).to_have_count(1)
            await expect(page.locator("#results tbody tr")).to_contain_text("paused")

            # Cancel it; retry it (pending again, still paused); resume: it runs.
            await page.click("#task-cancel")
            await expect(page.locator("#task-status")).to_have_text("cancelled")
            await page.click("#task-retry")
            await expect(page.locator("#task-status")).to_have_text("pending")
            await expect(page.locator("#task-waiting")).to_contain_text("paused")
            second = await _submit(client, "greeting", {"name": "Grace"})
            await paused.locator("button.resume").click()
            await expect(paused).to_have_count(0)
            await expect(page.locator("#task-status")).to_have_text("succeeded")
            await expect(page.locator("#task-events li")).to_have_count(6)
            assert await page.locator("#task-events li").evaluate_all(
                "items => items.map(i => i.dataset.event)"
            ) == ["submitted", "cancelled", "retried", "queued", "started", "succeeded"]

            # The screenshot the README shows: the second greeting open, every panel filled.
            await _show(page, second)
            await expect(page.locator("#task-status")).to_have_text("succeeded")
            await page.select_option("#filter-status", "")
            await page.fill("#filter-name", "greeting")
            await page.click("#filter-form button")
            await expect(page.locator("#count-succeeded b")).to_have_text("27")
            screenshot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "dashboard.png")
            await page.screenshot(path=str(screenshot), full_page=True)
            assert screenshot.stat().st_size > 10_000
            assert await page.locator("#problem").is_hidden()

    assert requests.external == [], "the dashboard asked the internet"
    assert requests.api_calls, "the page made no API call"


async def test_a_key_is_asked_once_kept_across_a_reload_and_sent_with_every_call(
    database_url: str, redis_url: str, tmp_path: Path
) -> None:
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    requests = Requests()
    env = _env(
        database_url,
        redis_url,
        port,
        API_KEYS=f"{KEY}:ops,{PLAIN_KEY}:plain",
        API_ADMIN_KEYS=KEY,
    )
    with cluster(env=env, log_dir=tmp_path) as running:
        running.start("api")
        async with (
            httpx.AsyncClient(base_url=origin, timeout=10) as client,
            _browser() as browser,
        ):
            await _api_up(client, running)
            page = await _page(browser, requests)
            await page.goto(f"{origin}/dashboard")
            # The first call was refused: the page asks for a key and shows no data.
            await expect(page.locator("#key-form")).to_be_visible()
            await expect(page.locator("#key-reason")).to_contain_text("401")
            await expect(page.locator("#board")).to_be_hidden()

            # A wrong key: refused, said so, asked again.
            await page.fill("#key-input", "not-a-key")
            await page.click("#key-form button")
            await expect(page.locator("#key-reason")).to_contain_text("that key was refused")

            # The right key: live, as the admin.
            await page.fill("#key-input", KEY)
            await page.click("#key-form button")
            await expect(page.locator("html[data-live='1']")).to_have_count(1)
            await expect(page.locator("#status-line")).to_contain_text("ops (admin)")
            first_key_call = len(requests.api_calls)

            # A reload keeps the key for the tab: no prompt.
            await page.reload()
            await expect(page.locator("html[data-live='1']")).to_have_count(1)
            await expect(page.locator("#key-form")).to_be_hidden()
            await expect(page.locator("#status-line")).to_contain_text("ops (admin)")

            # An ordinary key is refused an admin action, and the page says so.
            # It keeps polling with the key (a search too), then forgets it.
            await page.click("#filter-form button")
            await expect(page.locator("#results tbody tr")).to_have_count(1)  # "no task matches"
            polled = len(requests.api_calls)

            async def polled_again() -> bool:
                return len(requests.api_calls) >= polled + 3

            await wait_for(polled_again, timeout_s=15, message="three more polls")
            forgotten_at = len(requests.api_calls)
            await page.click("#forget-key")
            await expect(page.locator("#key-form")).to_be_visible()
            await page.fill("#key-input", PLAIN_KEY)
            await page.click("#key-form button")
            await expect(page.locator("#status-line")).to_contain_text("plain")
            await page.fill("#pause-scope", "cluster")
            await page.click("#pause-form button")
            await expect(page.locator("#problem")).to_contain_text("403 forbidden")
            await expect(page.locator("#problem")).to_contain_text("admin key")

    assert requests.external == []
    # Once the key was entered (the call that first carried it on), every call carried it
    # until it was forgotten.
    keyed = requests.api_calls[first_key_call - 1 : forgotten_at]
    assert len(keyed) > 5
    assert any("/api/v1/tasks?" in url for url, _ in keyed)
    assert [call for call in keyed if call[1] != f"Bearer {KEY}"] == []
