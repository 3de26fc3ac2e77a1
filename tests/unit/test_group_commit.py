"""The group committer's rules: what shares a batch, how a failed batch fails, stop and drain.

``commit`` here is a recorder standing in for a store's transaction (the stores' own
transactions are tested against real databases in tests/integration).
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from tests.support import wait_for
from throttler.group_commit import CommitterClosedError, GroupCommitter, Take


class Recorder:
    """Commits batches of strings; ``gate`` holds a transaction until the test opens it."""

    def __init__(self, *, fail_on: str | None = None, error: Exception | None = None) -> None:
        self.batches: list[list[str]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.entered = asyncio.Event()
        self.fail_on = fail_on
        self.error = error

    async def commit(self, take: Take[str]) -> list[str]:
        writes = take()  # as the transaction begins
        self.entered.set()
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in writes:
            assert self.error is not None
            raise self.error
        self.batches.append(list(writes))
        return [write.upper() for write in writes]


def committer(recorder: Recorder, **options: object) -> GroupCommitter[str, str]:
    writer: GroupCommitter[str, str] = GroupCommitter(
        recorder.commit,
        name="test",
        **options,  # type: ignore[arg-type]
    )
    writer.start()
    return writer


async def _held_first(recorder: Recorder, writer: GroupCommitter[str, str]) -> asyncio.Task[str]:
    """Submit "first" and hold its transaction open; later writes queue behind it."""
    recorder.gate.clear()
    first = asyncio.create_task(writer.submit("first"))
    await recorder.entered.wait()
    return first


async def test_writes_waiting_during_a_commit_share_the_next_one() -> None:
    recorder = Recorder()
    writer = committer(recorder)
    first = await _held_first(recorder, writer)
    rest = [asyncio.create_task(writer.submit(name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0)
    recorder.gate.set()

    assert await first == "FIRST"
    assert await asyncio.gather(*rest) == ["A", "B", "C"]
    await writer.close()
    assert recorder.batches == [["first"], ["a", "b", "c"]]


async def test_size_and_key_decide_what_fits_in_a_batch() -> None:
    recorder = Recorder()
    writer = committer(recorder, max_batch=4, size=len, key=lambda write: write[0])
    first = await _held_first(recorder, writer)
    # By size: "bb" + "cc" fill a batch of 4; by key: "b2" waits for the next batch.
    rest = [asyncio.create_task(writer.submit(name)) for name in ("bb", "cc", "b2", "d")]
    await asyncio.sleep(0)
    recorder.gate.set()
    await asyncio.gather(first, *rest)
    await writer.close()

    assert recorder.batches == [["first"], ["bb", "cc"], ["b2", "d"]]


@pytest.mark.parametrize("split_failed", [False, True])
async def test_a_transient_error_fails_every_write_of_the_batch(split_failed: bool) -> None:
    outage = OperationalError("COMMIT", {}, Exception("database is locked"))
    recorder = Recorder(fail_on="b", error=outage)
    writer = committer(recorder, split_failed=split_failed)
    first = await _held_first(recorder, writer)
    rest = [asyncio.create_task(writer.submit(name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0)
    recorder.gate.set()
    await first
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    await writer.close()

    assert outcomes == [outage] * 3
    assert recorder.batches == [["first"]]


async def test_a_statement_error_is_split_so_only_its_write_fails() -> None:
    bad = IntegrityError("INSERT", {}, Exception("duplicate key"))
    recorder = Recorder(fail_on="b", error=bad)
    writer = committer(recorder, split_failed=True)
    first = await _held_first(recorder, writer)
    rest = [asyncio.create_task(writer.submit(name)) for name in ("a", "b", "c")]
    await asyncio.sleep(0)
    recorder.gate.set()
    await first
    outcomes = await asyncio.gather(*rest, return_exceptions=True)
    await writer.close()

    assert outcomes == ["A", bad, "C"]
    assert recorder.batches == [["first"], ["a"], ["c"]]


async def test_a_cancelled_write_is_withdrawn_unless_it_may_not_be() -> None:
    recorder = Recorder()
    writer = committer(recorder)
    first = await _held_first(recorder, writer)
    withdrawn = asyncio.create_task(writer.submit("gone"))
    kept = asyncio.create_task(writer.submit("kept", withdrawable=False))
    await asyncio.sleep(0)
    withdrawn.cancel()
    kept.cancel()
    await asyncio.sleep(0)
    recorder.gate.set()
    await first
    for task in (withdrawn, kept):
        with pytest.raises(asyncio.CancelledError):
            await task
    await writer.close()

    # The caller of "kept" was cancelled, but only after its write was committed.
    assert recorder.batches == [["first"], ["kept"]]


async def test_close_commits_what_is_queued_then_refuses() -> None:
    recorder = Recorder()
    writer = committer(recorder)
    pending = [asyncio.create_task(writer.submit(name)) for name in ("a", "b")]
    await asyncio.sleep(0)
    await writer.close()

    assert await asyncio.gather(*pending) == ["A", "B"]
    with pytest.raises(CommitterClosedError):
        await writer.submit("late")


async def test_a_batch_in_flight_takes_every_write_that_arrived_before_its_turn() -> None:
    recorder = Recorder()
    handed_over = 0
    serial = asyncio.Lock()

    async def commit(take: Take[str]) -> list[str]:
        nonlocal handed_over
        handed_over += 1
        # Like a store's thread: one transaction after another, each taking its batch
        # as it begins.
        async with serial:
            return await recorder.commit(take)

    writer: GroupCommitter[str, str] = GroupCommitter(commit, name="test", max_in_flight=2)
    writer.start()
    first = await _held_first(recorder, writer)
    second = asyncio.create_task(writer.submit("second"))

    async def second_handed_over() -> bool:
        return handed_over == 2

    # The next batch is handed over while the first is still in its transaction...
    await wait_for(second_handed_over, timeout_s=5, message="the second batch handed over")
    # ... and writes arriving meanwhile join it rather than wait for a third.
    later = [asyncio.create_task(writer.submit(name)) for name in ("third", "fourth")]
    await asyncio.sleep(0)
    recorder.gate.set()

    assert list(await asyncio.gather(first, second, *later)) == [
        "FIRST",
        "SECOND",
        "THIRD",
        "FOURTH",
    ]
    await writer.close()
    assert handed_over == 2
    assert recorder.batches == [["first"], ["second", "third", "fourth"]]


async def _busy(recorder: Recorder, writer: GroupCommitter[str, str]) -> None:
    """One batch of two writes: the committer is busy, so its next batch may linger."""
    first = await _held_first(recorder, writer)
    pair = [asyncio.create_task(writer.submit(name)) for name in ("x", "y")]
    await asyncio.sleep(0)
    recorder.gate.set()
    await asyncio.gather(first, *pair)


async def test_a_busy_committer_lingers_for_writes_about_to_arrive() -> None:
    recorder = Recorder()
    # Four writers may be waiting: a batch of three lingers for the fourth.
    writer = committer(recorder, linger_s=1.0, writers=lambda: 4)
    await _busy(recorder, writer)
    early = [asyncio.create_task(writer.submit(name)) for name in ("a", "b", "c")]
    # The committer takes the three and lingers; the fourth arrives meanwhile.
    for _ in range(5):
        await asyncio.sleep(0)
    late = asyncio.create_task(writer.submit("d"))
    await asyncio.gather(*early, late)
    await writer.close()
    assert recorder.batches[2:] == [["a", "b", "c", "d"]]


async def test_a_batch_with_a_write_of_every_writer_commits_without_lingering() -> None:
    recorder = Recorder()
    # A linger far longer than the test's timeout: only skipping it lets the writes land.
    writer = committer(recorder, linger_s=600.0, writers=lambda: 3)
    await _busy(recorder, writer)
    writes = [asyncio.create_task(writer.submit(name)) for name in ("a", "b", "c")]
    assert await asyncio.wait_for(asyncio.gather(*writes), timeout=10) == ["A", "B", "C"]
    await writer.close()
    assert recorder.batches[2:] == [["a", "b", "c"]]
