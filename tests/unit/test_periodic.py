"""The periodic loop: recoverable failures are logged once per outage, bugs end the loop."""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from throttler.periodic import Periodic

log = logging.getLogger("tests.periodic")


class Scripted(Periodic):
    """Fail or succeed pass by pass as scripted; stop after the last pass."""

    name = "scripted"

    def __init__(self, script: list[BaseException | None]) -> None:
        super().__init__(interval_s=0.001, log=log)
        self.script = script
        self.passes = 0

    async def run_once(self) -> None:
        outcome = self.script[self.passes]
        self.passes += 1
        if self.passes == len(self.script):
            self.stop()
        if outcome is not None:
            raise outcome


async def test_an_outage_logs_one_line_when_it_starts_and_one_when_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = RedisConnectionError("Connection refused")
    loop = Scripted([None, down, down, down, None, None])
    with caplog.at_level(logging.INFO, logger=log.name):
        await asyncio.wait_for(loop.run(), timeout=5)

    assert loop.passes == 6
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "scripted.error"),
        (logging.WARNING, "scripted.recovered"),
    ]


async def test_a_bug_ends_the_loop() -> None:
    loop = Scripted([None, ZeroDivisionError("bug"), None])
    with pytest.raises(ZeroDivisionError):
        await asyncio.wait_for(loop.run(), timeout=5)
    assert loop.passes == 2
