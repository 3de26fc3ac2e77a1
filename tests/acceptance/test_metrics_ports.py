"""RELAY_METRICS_PORT and WORKER_METRICS_PORT: real processes serve their own counters."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.processes import cluster
from tests.integration.worker_harness import arq_pool, dispatch, wait_final
from tests.support import get_task, submit_task, wait_for
from throttler.db import SessionFactory
from throttler.models import utcnow
from throttler.settings import Settings

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def scrape(port: int, *, timeout_s: float = 20.0) -> dict[str, float]:
    """Samples by name and labels, e.g. ``x_total{task="greeting"}``, once the port answers."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(trust_env=False) as client:
        while True:
            try:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"nothing served metrics on {port}"
                await asyncio.sleep(0.1)
    assert response.status_code == 200
    return {
        sample.name + "".join(f'{{{k}="{v}"}}' for k, v in sorted(sample.labels.items())): (
            sample.value
        )
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "LOG_LEVEL": "INFO",
        **extra,
    }


async def test_a_worker_serves_its_attempts(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    port = _free_port()
    env = _env(settings, WORKER_METRICS_PORT=str(port))
    async with arq_pool(settings) as pool:
        with cluster(env=env, log_dir=tmp_path) as running:
            running.start("worker")
            task_id = await dispatch(
                sessions, pool, settings, name="greeting", payload={"name": "metrics"}
            )
            assert (await wait_final(sessions, task_id, timeout_s=30)).status == "succeeded"
            samples = await scrape(port)
    assert samples['throttler_worker_attempts_started_total{task="greeting"}'] == 1
    key = 'throttler_worker_attempts_finished_total{outcome="succeeded"}{task="greeting"}'
    assert samples[key] == 1
    assert samples['throttler_worker_run_seconds_count{task="greeting"}'] == 1


async def test_a_relay_serves_its_releases(
    settings: Settings, sessions: SessionFactory, tmp_path: Path
) -> None:
    async with sessions.begin() as session:
        task = await submit_task(
            session, name="greeting", account="a", payload={"name": "m"}, now=utcnow()
        )
    port = _free_port()
    env = _env(settings, RELAY_METRICS_PORT=str(port), RELAY_LIMITS="task:greeting inflight=100")
    with cluster(env=env, log_dir=tmp_path) as running:
        running.start("relay")

        async def queued() -> bool:
            async with sessions() as session:
                found = await get_task(session, task_id=task.id)
            return found is not None and found.status == "queued"

        await wait_for(queued, timeout_s=30, message="the relay to release the task")
        released = 'throttler_relay_released_total{task="greeting"}'

        async def counted() -> dict[str, float] | None:
            # Counted once the enqueue settles, just after the task is marked queued.
            samples = await scrape(port)
            return samples if released in samples else None

        samples = await wait_for(counted, timeout_s=30, message="the release to be counted")
        assert samples is not None
    assert samples[released] == 1
    assert samples['throttler_relay_scope_released_total{scope="task:greeting"}'] == 1
    assert samples["throttler_relay_claims_total"] >= 1
    # Every reason from the start: nothing held back here.
    for reason in ("inflight", "queue_full", "rate", "paused"):
        assert samples[f'throttler_relay_held_back_total{{reason="{reason}"}}'] == 0
