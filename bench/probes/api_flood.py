"""``python -m bench.probes.api_flood``: the API under keyless floods (issue 9, items 4 and 5).

Starts ``python -m api`` (from ``--code-dir``, this checkout by default, so the code
before a change can be measured too) on a fresh SQLite file with a private Redis and
``API_KEYS`` set, samples ``/healthz`` idle for 5 s (the machine's noise), then runs
two phases of ``--seconds`` each, sampling ``/healthz`` every 100 ms throughout on one
keep-alive connection, from a process of its own:

1. heads: 3 connections each sending one endless header (reconnecting when cut off),
   one attempt at a 300 MB header, and 3,000 connections that each send an unfinished
   head and then nothing. Prints the API's RSS before, at its peak and after, and how
   many of the 3,000 the server had closed by the end.
2. bulk: four connections posting 4 MiB bodies of ``{}`` items in a loop, with a valid
   key. Then, with nothing else running: the API's CPU time per such body (with and
   without the key, five in a row), the time to a 401 for one without a key (body sent,
   and headers only), and the answer's size for one item with a huge invalid input.

The load comes from this process, on the same machine as the server: figures from a
loaded machine are noisy, so compare runs made one after the other.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

import httpx

from bench.processes import ROOT, free_port, migrate, module_process
from devtools.redis_server import start_redis_server

KEY = "probe-key"
HEAD_START = b"GET /healthz HTTP/1.1\r\nhost: probe\r\nx-endless: "
UNFINISHED_HEAD = b"GET /healthz HTTP/1.1\r\nhost: probe\r\nx-a: b\r\n"
ENDLESS_CONNECTIONS = 3
UNFINISHED_CONNECTIONS = 3000
HUGE_HEADER_BYTES = 300 * 1024 * 1024
BULK_CONNECTIONS = 4
# 4 MiB (the bulk cap) of `{}` items: a little over 1.39 million of them.
FLOOD_BODY = b'{"tasks":[' + b",".join([b"{}"] * 1_398_000) + b"]}"
BULK = "/api/v1/tasks"
SAMPLE_EVERY_S = 0.1
CPU_BODIES = 5  # sent one after the other, to measure the API's CPU per body
ANSWER_TIMEOUT_S = 60.0
# A 4 MiB body took the code before issue 9 up to minutes to answer with four in flight.
BULK_TIMEOUT_S = 300.0


@dataclass
class Samples:
    latencies_ms: list[float] = field(default_factory=list)
    failures: int = 0

    def line(self) -> str:
        if not self.latencies_ms:
            return f"no answer ({self.failures} failed)"
        ordered = sorted(self.latencies_ms)
        return (
            f"p50 {statistics.median(ordered):.1f} ms, max {ordered[-1]:.1f} ms, "
            f"{len(ordered)} samples, {self.failures} failed"
        )


def cpu_s(pid: int) -> float:
    """User and system CPU seconds the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sample_healthz(base_url: str, ready: EventType, stop: EventType, results: Connection) -> None:
    """In its own process, so that the load this process makes does not delay the samples."""
    samples = Samples()
    with httpx.Client(base_url=base_url, timeout=ANSWER_TIMEOUT_S) as http:
        http.get("/healthz")  # connected: what follows is measured
        ready.set()
        while not stop.is_set():
            started = time.perf_counter()
            try:
                http.get("/healthz")
                samples.latencies_ms.append((time.perf_counter() - started) * 1000)
            except httpx.HTTPError:
                samples.failures += 1
            stop.wait(SAMPLE_EVERY_S)
    results.send(samples)


@contextlib.contextmanager
def healthz_sampler(base_url: str) -> Iterator[Samples]:
    """Sample /healthz every 100 ms until the block ends; the samples fill in then."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    receiving, sending = context.Pipe(duplex=False)
    process = context.Process(target=_sample_healthz, args=(base_url, ready, stop, sending))
    process.start()
    if not ready.wait(ANSWER_TIMEOUT_S):
        process.kill()
        raise RuntimeError("the /healthz sampler did not start")
    samples = Samples()
    try:
        yield samples
    finally:
        stop.set()
        got: Samples = receiving.recv()
        process.join()
        samples.latencies_ms, samples.failures = got.latencies_ms, got.failures


async def sample_rss(pid: int, peak: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_mb(pid))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.25)


async def _status_of(reader: asyncio.StreamReader) -> str:
    """The status of the server's answer, or how the connection ended without one."""
    try:
        line = await reader.readline()
    except ConnectionError:
        return "reset"
    return line.split(b" ")[1].decode() if line else "closed"


async def _send_until_answered(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    chunk: bytes,
    until: float,
    limit: int,
) -> tuple[int, str]:
    """Send ``chunk`` after ``chunk`` until the server answers, ``limit`` or ``until``."""
    answer = asyncio.create_task(_status_of(reader))
    sent = 0
    try:
        while sent < limit and not answer.done():
            left = until - time.monotonic()
            if left <= 0:
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), left)
            sent += len(chunk)
    except (ConnectionError, TimeoutError):
        pass
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.shield(answer), 1.0)
    if not answer.done():
        answer.cancel()
        return sent, "none (still reading)"
    return sent, answer.result()


async def endless_header(port: int, until: float, answers: list[str]) -> None:
    """Send one header for ever; when the server cuts it off, start again."""
    while time.monotonic() < until:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(HEAD_START)
        _, answer = await _send_until_answered(
            reader, writer, b"a" * 65536, until, limit=HUGE_HEADER_BYTES
        )
        answers.append(answer)
        writer.close()


async def huge_header(port: int, until: float) -> tuple[int, str]:
    """Try to send a 300 MB header; return the bytes sent and the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(HEAD_START)
    sent, answer = await _send_until_answered(
        reader, writer, b"a" * (1024 * 1024), until, limit=HUGE_HEADER_BYTES
    )
    if sent >= HUGE_HEADER_BYTES and answer.startswith("none"):
        writer.write(b"\r\n\r\n")  # the whole header went in: finish the head
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(writer.drain(), 10)
            answer = await asyncio.wait_for(_status_of(reader), 10)
    writer.close()
    return sent, answer


async def unfinished_head(port: int, opened: float, closed_after: list[float]) -> None:
    """One connection sending an unfinished head, then waiting to be closed."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return
    try:
        writer.write(UNFINISHED_HEAD)
        await writer.drain()
        await reader.read()  # until the server closes the connection
        closed_after.append(time.monotonic() - opened)
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def heads_phase(port: int, pid: int, seconds: float) -> None:
    base_url = f"http://127.0.0.1:{port}"
    stop = asyncio.Event()
    peak = [rss_mb(pid)]
    before = peak[0]
    with healthz_sampler(base_url) as samples:
        await _heads_load(port, pid, seconds, stop, peak)
    after = rss_mb(pid)
    print(f"/healthz during: {samples.line()}")
    print(f"api RSS: {before:.0f} MB before, {peak[0]:.0f} MB peak, {after:.0f} MB after")


async def _heads_load(
    port: int, pid: int, seconds: float, stop: asyncio.Event, peak: list[float]
) -> None:
    rss = asyncio.create_task(sample_rss(pid, peak, stop))
    until = time.monotonic() + seconds
    opened = time.monotonic()
    closed_after: list[float] = []
    waiting = [
        asyncio.create_task(unfinished_head(port, opened, closed_after))
        for _ in range(UNFINISHED_CONNECTIONS)
    ]
    answers: list[str] = []
    endless = [
        asyncio.create_task(endless_header(port, until, answers))
        for _ in range(ENDLESS_CONNECTIONS)
    ]
    huge_sent, huge_answer = await huge_header(port, until)
    await asyncio.gather(*endless)
    stop.set()
    await rss
    still_open = sum(1 for task in waiting if not task.done())
    for task in waiting:
        task.cancel()
    await asyncio.gather(*waiting, return_exceptions=True)
    await asyncio.sleep(2)  # let the server see the closes
    counted = {answer: answers.count(answer) for answer in sorted(set(answers))}
    print(f"## heads, {seconds:g} s")
    print(f"endless headers: {len(answers)} attempts, answers {counted}")
    print(f"300 MB header: {huge_sent / 1e6:.1f} MB sent, answer {huge_answer}")
    closed_line = (
        f"{len(closed_after)} closed by the server (last after {max(closed_after):.1f} s), "
        if closed_after
        else "none closed by the server, "
    )
    print(f"{UNFINISHED_CONNECTIONS} unfinished heads: {closed_line}{still_open} still open")


async def bulk_loop(base_url: str, until: float, answers: list[tuple[int, int, float]]) -> None:
    """Post the flood body until ``until``; an answer that never comes counts as status 0."""
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    async with httpx.AsyncClient(base_url=base_url, timeout=BULK_TIMEOUT_S) as http:
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                response = await http.post(BULK, content=FLOOD_BODY, headers=headers)
            except httpx.HTTPError:
                answers.append((0, 0, time.perf_counter() - started))
                continue
            answers.append(
                (response.status_code, len(response.content), time.perf_counter() - started)
            )


async def time_to_401_headers_only(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.perf_counter()
    writer.write(
        b"POST /api/v1/tasks HTTP/1.1\r\nhost: probe\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(FLOOD_BODY)
    )
    try:
        line = await asyncio.wait_for(reader.readline(), 10.0)
        elapsed_ms = (time.perf_counter() - started) * 1000
        return f"{line.split(b' ')[1].decode()} after {elapsed_ms:.1f} ms"
    except TimeoutError:
        return "no answer within 10 s (waits for the body)"
    finally:
        writer.close()


async def bulk_phase(port: int, pid: int, seconds: float) -> None:
    base_url = f"http://127.0.0.1:{port}"
    answers: list[tuple[int, int, float]] = []
    until = time.monotonic() + seconds
    with healthz_sampler(base_url) as samples:
        await asyncio.gather(
            *(bulk_loop(base_url, until, answers) for _ in range(BULK_CONNECTIONS))
        )
    statuses = {code: sum(1 for a in answers if a[0] == code) for code in {a[0] for a in answers}}
    sizes = sorted({a[1] for a in answers})
    durations = [a[2] for a in answers]
    print(f"## bulk, {seconds:g} s: {BULK_CONNECTIONS} connections of 4 MiB `{{}}` items")
    print(f"/healthz during: {samples.line()}")
    print(
        f"answers: {statuses}, body sizes {sizes} bytes, "
        f"request p50 {statistics.median(durations) * 1000:.0f} ms"
        if answers
        else "answers: none"
    )
    async with httpx.AsyncClient(base_url=base_url, timeout=BULK_TIMEOUT_S) as http:
        for label, auth in (("with the key", {"authorization": f"Bearer {KEY}"}), ("no key", {})):
            used = cpu_s(pid)
            for _ in range(CPU_BODIES):
                answer = await http.post(
                    BULK, content=FLOOD_BODY, headers={"content-type": "application/json", **auth}
                )
            per_body_ms = (cpu_s(pid) - used) / CPU_BODIES * 1000
            print(f"api CPU per 4 MiB body, {label}: {per_body_ms:.0f} ms ({answer.status_code})")
        started = time.perf_counter()
        keyless = await http.post(
            BULK, content=FLOOD_BODY, headers={"content-type": "application/json"}
        )
        print(
            f"no key, body sent: {keyless.status_code} after "
            f"{(time.perf_counter() - started) * 1000:.0f} ms"
        )
        print(f"no key, headers only: {await time_to_401_headers_only(port)}")
        huge_input = {"tasks": [{"name": "greeting", "input": {"name": [0] * 1_000_000}}]}
        headers = {"authorization": f"Bearer {KEY}"}
        invalid = await http.post(BULK, json=huge_input, headers=headers)
        print(f"huge invalid input (3 MB): {invalid.status_code}, {len(invalid.content)} bytes")


@contextlib.contextmanager
def api_server(code_dir: Path, workdir: Path) -> Iterator[tuple[int, int]]:
    redis = start_redis_server(workdir=workdir / "redis")
    try:
        port = free_port()
        env = {
            **os.environ,
            "DATABASE_URL": f"sqlite+aiosqlite:///{workdir}/probe.db",
            "REDIS_URL": redis.url,
            "API_PORT": str(port),
            "API_KEYS": f"{KEY}:acme",
            "LOG_LEVEL": "ERROR",
        }
        migrate(env, code_dir=code_dir)
        with module_process(["api"], env, code_dir=code_dir) as process:
            deadline = time.monotonic() + 30
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the api did not start")
                time.sleep(0.1)
            yield port, process.pid
    finally:
        redis.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--code-dir", type=Path, default=ROOT, help="checkout to run the api of")
    parser.add_argument("--phase", choices=["heads", "bulk", "both"], default="both")
    args = parser.parse_args()
    print(f"code: {args.code_dir.resolve()}; load from this process on the same machine")
    with (
        tempfile.TemporaryDirectory() as workdir,
        api_server(args.code_dir, Path(workdir)) as (
            port,
            pid,
        ),
    ):
        # The machine's own noise, to read the figures under load against.
        with healthz_sampler(f"http://127.0.0.1:{port}") as idle:
            time.sleep(min(args.seconds, 5.0))
        print(f"## idle\n/healthz, nothing else running: {idle.line()}")
        if args.phase in ("heads", "both"):
            asyncio.run(heads_phase(port, pid, args.seconds))
        if args.phase in ("bulk", "both"):
            asyncio.run(bulk_phase(port, pid, args.seconds))


if __name__ == "__main__":
    main()
