"""``throttler.event_loop.run``: the relay's and the worker's loop and collector settings."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest
import uvloop

from throttler import event_loop


@pytest.fixture
def collector() -> Iterator[None]:
    """Give the test process its own collector thresholds back afterwards."""
    thresholds = gc.get_threshold()
    yield
    gc.set_threshold(*thresholds)


async def _inside() -> tuple[type[asyncio.AbstractEventLoop], tuple[int, int, int]]:
    return type(asyncio.get_running_loop()), gc.get_threshold()


@pytest.mark.usefixtures("collector")
def test_run_uses_uvloop_and_collects_less_often() -> None:
    gc.set_threshold(700, 10, 10)  # Python's defaults, whatever the test process had
    loop_type, thresholds = event_loop.run(_inside())
    assert issubclass(loop_type, uvloop.Loop)
    assert thresholds == event_loop.GC_THRESHOLDS
    assert thresholds[0] > 700
