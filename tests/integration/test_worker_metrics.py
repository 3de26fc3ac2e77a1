"""A worker's own metrics after a known workload, and WORKER_METRICS_PORT serving them."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections import Counter
from typing import ClassVar

import httpx
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.worker_harness import (
    arq_pool,
    dispatch,
    fast_retries,
    running_relay,
    running_worker,
    wait_final,
)
from throttler.catalog import GREETING, GreetingInput
from throttler.db import SessionFactory
from throttler.settings import Settings
from worker import metrics
from worker.taskkit import PermanentError, Resources, RetriableTask
from worker.tasks.greeting import GreetingOutput

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def samples() -> Samples:
    return parse(generate_latest(metrics.REGISTRY).decode())


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    return after.get(key, 0.0) - before.get(key, 0.0)


class FailsTwiceThenRefuses(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    """Twice a retriable error, then greet; a name starting "no" fails for good."""

    output_model = GreetingOutput
    calls: ClassVar[Counter[str]] = Counter()

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        if params.name.startswith("no"):
            raise PermanentError("no such person")
        self.calls[params.name] += 1
        if self.calls[params.name] <= 2:
            raise ConnectionError("flaky")
        return GreetingOutput(message=f"Hello, {params.name}!")


async def test_attempts_and_histograms_count_the_known_workload(
    settings: Settings, sessions: SessionFactory
) -> None:
    settings = fast_retries(settings)
    before = samples()
    async with (
        arq_pool(settings) as pool,
        running_relay(settings, sessions, pool),
        running_worker(settings, tasks=[FailsTwiceThenRefuses]),
    ):
        flaky = await dispatch(
            sessions, pool, settings, name="greeting", payload={"name": uuid.uuid4().hex}
        )
        refused = await dispatch(
            sessions, pool, settings, name="greeting", payload={"name": f"no-{uuid.uuid4()}"}
        )
        assert (await wait_final(sessions, flaky)).status == "succeeded"
        assert (await wait_final(sessions, refused)).status == "failed"
    after = samples()
    name = "throttler_worker_attempts_started_total"
    assert delta(before, after, name, task="greeting") == 4
    finished = "throttler_worker_attempts_finished_total"
    assert delta(before, after, finished, task="greeting", outcome="retrying") == 2
    assert delta(before, after, finished, task="greeting", outcome="succeeded") == 1
    assert delta(before, after, finished, task="greeting", outcome="failed") == 1
    run_count = "throttler_worker_run_seconds_count"
    assert delta(before, after, run_count, task="greeting") == 4
    wait_count = "throttler_worker_queue_wait_seconds_count"
    assert delta(before, after, wait_count, task="greeting") == 4
    assert delta(before, after, "throttler_worker_queue_wait_seconds_sum", task="greeting") >= 0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_the_metrics_port_serves_the_registry() -> None:
    port = _free_port()
    metrics.serve_metrics(port, addr="127.0.0.1")
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                response = await client.get(f"http://127.0.0.1:{port}/metrics")
                break
            except httpx.ConnectError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("nothing listens on the metrics port")
    assert response.status_code == 200
    names = {family.name for family in text_string_to_metric_families(response.text)}
    assert {"throttler_worker_attempts_started", "throttler_worker_run_seconds"} <= names
