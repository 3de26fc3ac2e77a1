"""A second "host" for partition tests: a Linux network namespace joined by veth links.

``partitioned_host()`` creates a namespace with two veth pairs, each its own /30 subnet:
one link carries the database, the other Redis. The root-namespace end of each link gets
an address that ``Forwarder`` (a TCP relay in a thread of the test process) listens on,
passing connections to the real server on 127.0.0.1: PostgreSQL here listens on loopback
only. Processes of "host B" run under ``ip netns exec``; they reach the servers only
through the links, so setting a link down cuts them off while "host A" (the root
namespace, on 127.0.0.1) keeps going.

Needs root, iproute2's ``ip`` and a kernel that lets us create namespaces (not always so
in a container): ``netns_unavailable()`` says why not, for a skip. Names carry a random
suffix, and everything is removed on exit, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from tests.acceptance.processes import Cluster, Component
from tests.support import ROOT

IP_TIMEOUT_S = 10.0


class NetnsError(RuntimeError):
    """An ``ip`` command failed."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    ip = shutil.which("ip") or "ip"
    done = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=False
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def netns_unavailable() -> str | None:
    """Why this machine cannot run the partition tests (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux-only"
    if os.geteuid() != 0:
        return "creating network namespaces needs root (CI runs the suite as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    probe = f"thr-probe-{secrets.token_hex(3)}"
    added = _ip("netns", "add", probe, check=False)
    if added.returncode != 0:
        return f"`ip netns add` is not permitted here: {added.stderr.strip()}"
    _ip("netns", "delete", probe, check=False)
    return None


@dataclass(frozen=True, kw_only=True, slots=True)
class Link:
    """One veth pair: ``outer`` in the root namespace, ``inner`` in host B's."""

    outer: str
    inner: str
    outer_address: str  # where host B reaches the server (a forwarder listens here)
    inner_address: str

    def set_up(self, up: bool) -> None:
        # Down on the root side takes the carrier from both ends: nothing crosses.
        _ip("link", "set", self.outer, "up" if up else "down")


@dataclass(kw_only=True)
class Host:
    """Host B: its namespace and its two links."""

    namespace: str
    database: Link
    redis: Link
    cuts: list[str] = field(default_factory=list)

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run inside the namespace."""
        return [shutil.which("ip") or "ip", "netns", "exec", self.namespace, *argv]

    def cut(self, *, database: bool, redis: bool) -> None:
        for wanted, link in ((database, self.database), (redis, self.redis)):
            if wanted:
                link.set_up(False)
        self.cuts.append(f"database={database} redis={redis}")

    def heal(self) -> None:
        self.database.set_up(True)
        self.redis.set_up(True)


def _free_prefix() -> str:
    """``10.x.y.`` with x, y random and unused here: the links take 10.x.y.0/30 and
    10.x.y.4/30, apart from any other run's."""
    taken = _ip("-o", "-4", "addr", "show").stdout
    for _ in range(50):
        prefix = f"10.{random.randint(160, 250)}.{random.randint(0, 255)}."
        if prefix not in taken:
            return prefix
    raise NetnsError("no free 10.x.y.0/29 found for the veth links")


@contextlib.contextmanager
def partitioned_host() -> Iterator[Host]:
    """Create host B's namespace and links; remove them on exit, whatever happened."""
    suffix = secrets.token_hex(3)
    namespace = f"thr-b-{suffix}"
    prefix = _free_prefix()
    database = Link(
        outer=f"thd{suffix}",
        inner=f"thdb{suffix}",
        outer_address=f"{prefix}1",
        inner_address=f"{prefix}2",
    )
    redis = Link(
        outer=f"thr{suffix}",
        inner=f"thrb{suffix}",
        outer_address=f"{prefix}5",
        inner_address=f"{prefix}6",
    )
    _ip("netns", "add", namespace)
    try:
        _ip("-n", namespace, "link", "set", "lo", "up")
        for link in (database, redis):
            _ip("link", "add", link.outer, "type", "veth", "peer", "name", link.inner)
            _ip("link", "set", link.inner, "netns", namespace)
            _ip("addr", "add", f"{link.outer_address}/30", "dev", link.outer)
            _ip("-n", namespace, "addr", "add", f"{link.inner_address}/30", "dev", link.inner)
            _ip("link", "set", link.outer, "up")
            _ip("-n", namespace, "link", "set", link.inner, "up")
        yield Host(namespace=namespace, database=database, redis=redis)
    finally:
        for link in (database, redis):
            # Deleting one end deletes the pair; the inner end goes with the namespace.
            _ip("link", "delete", link.outer, check=False)
        _ip("netns", "delete", namespace, check=False)


class Forwarder:
    """A TCP forwarder in a thread of its own: ``listen`` -> ``target``, byte for byte.

    Each accepted connection opens one to the target and copies both ways until either
    side closes. A cut link leaves the connections open and silent, as a real partition
    does: TCP on host B's side retransmits, and its bytes arrive if the link comes back.
    """

    def __init__(self, *, listen: tuple[str, int], target: tuple[str, int]) -> None:
        self.listen = listen
        self.target = target
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        # The local port of each connection to the target: how the server tells our
        # clients apart (PostgreSQL's pg_stat_activity.client_port).
        self.upstream_ports: set[int] = set()
        # Cleared by ``hold``: bytes read meanwhile wait, and go on at ``release``.
        self._flowing: asyncio.Event | None = None

    def start(self) -> Forwarder:
        self._thread.start()

        async def flowing() -> asyncio.Event:
            event = asyncio.Event()
            event.set()
            return event

        self._flowing = asyncio.run_coroutine_threadsafe(flowing(), self._loop).result(10)
        started: Future[asyncio.Server] = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._accept, *self.listen), self._loop
        )
        self._server = started.result(timeout=10)
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self.upstream_ports.add(int(up_writer.get_extra_info("sockname")[1]))
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            pipe = asyncio.create_task(self._copy(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    def hold(self) -> None:
        """Stop passing bytes on, from now (the current chunk aside); they wait in here.

        The first instant of a partition, taken atomically: what a client sends from now
        on reaches the server only at ``release`` (as TCP retransmits it after a cut).
        """
        self._set_flowing(False)

    def release(self) -> None:
        """Pass on what was held, and everything after it."""
        self._set_flowing(True)

    def _set_flowing(self, flowing: bool) -> None:
        async def apply() -> None:
            assert self._flowing is not None
            if flowing:
                self._flowing.set()
            else:
                self._flowing.clear()

        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(timeout=10)

    async def _copy(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while chunk := await source.read(65536):
                await self._flowing.wait()
                sink.write(chunk)
                await sink.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(OSError, RuntimeError):
                sink.close()

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            for pipe in list(self._pipes):
                pipe.cancel()
            await asyncio.gather(*self._pipes, return_exceptions=True)

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(timeout=10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._loop.close()


def start_in(
    host: Host, running: Cluster, module: str, *, extra_env: Mapping[str, str] | None = None
) -> Component:
    """Start ``python -m module`` inside host B's namespace, as ``Cluster.start`` does."""
    index = sum(1 for component in running.components if component.module == module)
    log_path: Path = running.log_dir / f"b-{module.replace('.', '_')}-{index}.log"
    env = {**os.environ, **running.env, **(extra_env or {})}
    with log_path.open("wb") as log:
        # `ip netns exec` execs the command: the process id is the component's.
        process = subprocess.Popen(
            host.command([sys.executable, "-m", module]),
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    component = Component(module=module, process=process, log_path=log_path)
    running.components.append(component)
    return component
