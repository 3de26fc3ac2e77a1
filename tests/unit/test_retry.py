"""One backoff and one outage log for every retry loop (throttler.retry)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest

from throttler.retry import Backoff, Outage, pause, retry_until_done

LOG = logging.getLogger("tests.retry")


def _first(backoff: Backoff, count: int, *, rng_value: float = 0.0) -> list[float]:
    return list(itertools.islice(backoff.delays(rng=lambda: rng_value), count))


def test_delays_double_from_the_first_up_to_the_cap() -> None:
    backoff = Backoff(first_s=0.1, max_s=1.0)
    assert _first(backoff, 7) == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0])


def test_the_multiplier_sets_the_growth() -> None:
    assert _first(Backoff(first_s=1.0, max_s=100.0, multiplier=3.0), 4) == [1.0, 3.0, 9.0, 27.0]
    assert _first(Backoff(first_s=0.5, max_s=100.0, multiplier=1.0), 3) == [0.5, 0.5, 0.5]


def test_jitter_takes_at_most_its_fraction_off_each_delay() -> None:
    backoff = Backoff(first_s=1.0, max_s=8.0, jitter=0.25)
    nominal = [1.0, 2.0, 4.0, 8.0, 8.0]
    assert _first(backoff, 5, rng_value=0.0) == nominal
    assert _first(backoff, 5, rng_value=1.0) == pytest.approx([0.75 * d for d in nominal])
    drawn = list(itertools.islice(backoff.delays(), 2000))
    for index, delay_s in enumerate(drawn):
        full = nominal[min(index, 4)]
        assert 0.75 * full <= delay_s <= full
    assert len({round(d, 9) for d in drawn[5:]}) > 1  # it is random


@pytest.mark.parametrize(
    "options",
    [
        {"first_s": 0.0, "max_s": 1.0},
        {"first_s": 2.0, "max_s": 1.0},
        {"first_s": 0.1, "max_s": 1.0, "multiplier": 0.5},
        {"first_s": 0.1, "max_s": 1.0, "jitter": 1.5},
    ],
)
def test_impossible_policies_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="need"):
        Backoff(**options)


def _lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOG.name]


def test_an_outage_is_one_line_down_and_one_up_with_debug_between(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    outage = Outage(LOG, down_event="thing.down", up_event="thing.up", thing="x")
    outage.succeeded()  # not down: nothing to say
    assert not outage.down
    for _ in range(3):
        outage.failed(ConnectionError("refused\nmore"), retry_in_s=0.5)
    assert outage.down
    outage.succeeded()
    outage.succeeded()
    assert _lines(caplog) == [
        (logging.WARNING, "thing.down"),
        (logging.DEBUG, "thing.down"),
        (logging.DEBUG, "thing.down"),
        (logging.WARNING, "thing.up"),
    ]
    down, *_, up = (r for r in caplog.records if r.name == LOG.name)
    assert vars(down)["fields"] == {
        "thing": "x",
        "error": "ConnectionError: refused",
        "retry_in_s": 0.5,
    }
    assert vars(up)["fields"]["failed_tries"] == 3
    assert vars(up)["fields"]["down_s"] >= 0
    assert not outage.down


def test_retries_may_log_under_their_own_name(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    outage = Outage(LOG, down_event="d", up_event="u", retry_event="r")
    for _ in range(3):
        outage.failed(OSError("x"))
    outage.succeeded()
    assert _lines(caplog) == [
        (logging.WARNING, "d"),
        (logging.DEBUG, "r"),
        (logging.DEBUG, "r"),
        (logging.WARNING, "u"),
    ]


def test_a_flapping_dependency_stays_one_outage_until_enough_successes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    outage = Outage(LOG, down_event="d", up_event="u", successes_to_recover=3)
    outage.failed(OSError("x"))
    outage.succeeded()
    outage.succeeded()
    outage.failed(OSError("y"))  # the count of successes starts again
    outage.succeeded()
    outage.succeeded()
    assert outage.down
    outage.succeeded()
    assert not outage.down
    assert _lines(caplog) == [
        (logging.WARNING, "d"),
        (logging.DEBUG, "d"),
        (logging.WARNING, "u"),
    ]


async def test_pause_sleeps_unless_the_event_comes_first() -> None:
    stop = asyncio.Event()
    started = time.monotonic()
    assert await pause(0.05, unless=stop) is False
    assert time.monotonic() - started >= 0.04
    asyncio.get_running_loop().call_later(0.01, stop.set)
    started = time.monotonic()
    assert await pause(30.0, unless=stop) is True
    assert time.monotonic() - started < 5.0


FAST = Backoff(first_s=0.001, max_s=0.004)


async def test_retry_until_done_retries_the_listed_errors_and_logs_the_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOG.name)
    tries: list[int] = []

    async def attempt() -> str:
        tries.append(1)
        if len(tries) < 4:
            raise ConnectionError(f"try {len(tries)}")
        return "done"

    outage = Outage(LOG, down_event="d", up_event="u")
    result = await retry_until_done(
        attempt, retry_on=(ConnectionError,), backoff=FAST, outage=outage, stopping=asyncio.Event()
    )
    assert (result, len(tries)) == ("done", 4)
    assert [message for _, message in _lines(caplog)] == ["d", "d", "d", "u"]


async def test_retry_until_done_lets_other_errors_through() -> None:
    async def attempt() -> None:
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        await retry_until_done(
            attempt,
            retry_on=(ConnectionError,),
            backoff=FAST,
            outage=Outage(LOG, down_event="d", up_event="u"),
            stopping=asyncio.Event(),
        )


async def test_retry_until_done_gives_up_when_stopped() -> None:
    stopping = asyncio.Event()
    tries: list[int] = []

    async def attempt() -> str:
        tries.append(1)
        if len(tries) == 3:
            stopping.set()
        raise ConnectionError("down")

    result = await retry_until_done(
        attempt,
        retry_on=(ConnectionError,),
        backoff=Backoff(first_s=0.001, max_s=60.0),
        outage=Outage(LOG, down_event="d", up_event="u"),
        stopping=stopping,
    )
    assert (result, len(tries)) == (None, 3)
