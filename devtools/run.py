"""`make run` (`python -m devtools.run`): a private Redis, migrations, then api, relay and
a worker with prefixed logs.

Each component runs in its own process group, so a Ctrl-C in the terminal reaches only
this supervisor (and the Redis it started, which is shielded from SIGINT); the
supervisor then stops every component exactly once with SIGTERM, waits a grace period,
kills what is left, and stops Redis last so components can shut down cleanly. Each
component has its own grace: the worker's is the grace it promises its running jobs
(WORKER_SHUTDOWN_GRACE_S) plus a margin. Should the supervisor itself be killed, Linux
sends SIGTERM to every process it started (PR_SET_PDEATHSIG), Redis included.

The API port is checked before anything starts: a taken port is one line, not a banner
followed by a crash.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO

from alembic import command
from alembic.config import Config

from devtools.redis_server import RedisServer, RedisServerError, start_redis_server
from throttler.logs import KeyValueFormatter, fields
from throttler.settings import Settings, load_settings

COMPONENTS = ("api", "relay", "worker")
PROJECT_ROOT = Path(__file__).resolve().parent.parent
RUN_DIR_NAME = ".run"
# Seconds from SIGTERM to SIGKILL: api and relay stop within a second or two.
STOP_GRACE_S = 10.0
# Added to WORKER_SHUTDOWN_GRACE_S: the worker cancels what is still running at its grace,
# then writes those outcomes and closes its pools.
WORKER_STOP_MARGIN_S = 10.0
POLL_INTERVAL_S = 0.1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PREFIX_WIDTH = 6
COLORS = {"devrun": "1", "api": "36", "relay": "35", "worker": "33"}
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CREDENTIALS = re.compile(r"//(?P<user>[^:/@]*):[^@/]*@")

log = logging.getLogger("devtools.run")


class DevRunError(RuntimeError):
    """Something `make run` needs could not be started."""


class Console:
    """Write whole lines as ``name   | text``, one writer at a time, colored on a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self._color = stream.isatty()

    def write(self, name: str, text: str) -> None:
        prefix = f"{name:<{PREFIX_WIDTH}} |"
        if self._color:
            prefix = f"\033[{COLORS.get(name, '0')}m{prefix}\033[0m"
        with self._lock:
            self._stream.write(f"{prefix} {text}\n")
            self._stream.flush()


class ConsoleHandler(logging.Handler):
    """Route the supervisor's own log records through the console under ``devrun``."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.write("devrun", self.format(record))
        except Exception:
            self.handleError(record)


class StopSignals:
    """Turn SIGINT, SIGTERM and SIGHUP into a stop request; a second one forces."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self.forced = threading.Event()
        self.starting = True
        self.signal_name = ""

    def install(self) -> None:
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested.is_set():
            self.forced.set()
            if self.starting:
                # A migration or Redis start that hangs can still be interrupted.
                raise KeyboardInterrupt
            return
        self.signal_name = signal.Signals(signum).name
        self.requested.set()


@dataclass(kw_only=True)
class Child:
    """One component process and the thread that copies its output to the console."""

    name: str
    process: subprocess.Popen[bytes]
    pump: threading.Thread


def configure_console_logging(console: Console, *, level: str) -> None:
    handler = ConsoleHandler(console)
    formatter = KeyValueFormatter("devrun")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


@contextmanager
def sigint_blocked() -> Iterator[None]:
    """Block SIGINT here; a child started meanwhile inherits the mask and so ignores Ctrl-C."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def start_private_redis(run_dir: Path) -> RedisServer:
    # Redis keeps SIGINT blocked, so a terminal Ctrl-C cannot stop it before the
    # components that use it; it is stopped last, with SIGTERM.
    with sigint_blocked():
        server = start_redis_server(workdir=run_dir, preexec_fn=_die_with_parent())
    log.info(
        "devrun.redis_started",
        extra=fields(
            url=server.url,
            pid=server.process.pid,
            binary=args[0] if isinstance(args := server.process.args, list) else args,
            log=run_dir / f"redis-{server.port}.log",
        ),
    )
    return server


def apply_migrations(database_url: str) -> None:
    """Run ``alembic upgrade head`` in-process against ``database_url``."""
    ini = PROJECT_ROOT / "alembic.ini"
    if not ini.is_file():
        raise DevRunError(f"{ini} not found: make run needs the source checkout")
    config = Config(str(ini))
    config.set_main_option("script_location", str(PROJECT_ROOT / "migrations"))
    # The ini parser interpolates %(...)s; URL-encoded passwords contain '%'.
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")


def _die_with_parent() -> Callable[[], None] | None:
    """Return a pre-exec hook asking Linux to SIGTERM the child if this process dies.

    Linux ties the signal to the thread that forked: call it (and fork) from the main thread.
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def spawn(name: str, *, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", name],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        # Own process group: terminal signals skip it; we send exactly one SIGTERM.
        process_group=0,
        # Safe here: run() forks every component before starting any thread.
        preexec_fn=_die_with_parent(),
    )


def pump_output(name: str, stream: IO[bytes], console: Console) -> None:
    with stream:
        for raw in stream:
            console.write(name, raw.decode(errors="replace").rstrip("\r\n"))


def redact(url: str) -> str:
    """Hide the password of ``scheme://user:password@host/...`` for logging."""
    return CREDENTIALS.sub(r"//\g<user>:***@", url)


def display_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):  # noqa: S104 - only mapping a bind-all address for display
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def announce(console: Console, settings: Settings) -> None:
    base = f"http://{display_host(settings.api_host)}:{settings.api_port}"
    console.write("devrun", f"API   {base}/api/v1  (health: {base}/healthz)")
    console.write("devrun", f"docs  {base}/docs")
    console.write("devrun", "Ctrl-C stops everything")


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with suppress(ProcessLookupError):  # already gone and reaped
        os.killpg(process.pid, signum)


def stop_grace_s(name: str, settings: Settings) -> float:
    """Seconds ``name`` gets between SIGTERM and SIGKILL."""
    if name == "worker":
        return settings.worker_shutdown_grace_s + WORKER_STOP_MARGIN_S
    return STOP_GRACE_S


def check_api_port_free(settings: Settings) -> None:
    """Fail in one line, before anything starts, when the API's address is taken."""
    host = settings.api_host or "0.0.0.0"  # noqa: S104 - uvicorn's meaning of an empty host
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As uvicorn binds: SO_REUSEADDR, so a port in TIME_WAIT counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, settings.api_port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise DevRunError(
                    f"cannot listen on {host}:{settings.api_port} ({error.strerror}): "
                    f"set API_HOST/API_PORT"
                ) from error
            raise DevRunError(
                f"port {settings.api_port} on {host} is already in use: set API_PORT to a "
                f"free port, e.g. API_PORT={settings.api_port + 1} make run"
            ) from error


def stop_children(children: list[Child], stop: StopSignals, settings: Settings) -> None:
    """SIGTERM each live component once, wait its grace period, then SIGKILL it."""
    started = time.monotonic()
    for child in children:
        if child.process.poll() is None:
            log.info("devrun.stopping", extra=fields(component=child.name, pid=child.process.pid))
            _signal_group(child.process, signal.SIGTERM)
    deadlines = {child.name: started + stop_grace_s(child.name, settings) for child in children}
    while not stop.forced.is_set():
        now = time.monotonic()
        waiting = [
            child
            for child in children
            if child.process.poll() is None and now < deadlines[child.name]
        ]
        if not waiting:
            break
        for child in children:
            if child.process.poll() is None and now >= deadlines[child.name]:
                _kill(child)
        stop.forced.wait(POLL_INTERVAL_S)
    for child in children:
        if child.process.poll() is None:
            _kill(child)
        log.info(
            "devrun.stopped",
            extra=fields(component=child.name, exit_code=child.process.returncode),
        )
    for child in children:
        if child.pump.ident is not None:  # started
            # A grandchild holding the pipe open must not keep us here.
            child.pump.join(timeout=1.0)


def _kill(child: Child) -> None:
    log.warning("devrun.killing", extra=fields(component=child.name, pid=child.process.pid))
    _signal_group(child.process, signal.SIGKILL)
    child.process.wait()


def supervise(children: list[Child], redis: RedisServer | None, stop: StopSignals) -> str | None:
    """Wait for a stop signal; return why a process ended on its own, or None."""
    while not stop.requested.wait(POLL_INTERVAL_S):
        for child in children:
            code = child.process.poll()
            if code is not None:
                return f"{child.name} exited with code {code}"
        if redis is not None and redis.process.poll() is not None:
            return f"redis-server exited with code {redis.process.returncode}"
    return None


def needs_private_redis(settings: Settings) -> bool:
    """Whether make run starts its own Redis: not when REDIS_URL or REDIS_SENTINELS names
    one (with sentinels, REDIS_URL keeps only its credentials and database)."""
    return "redis_url" not in settings.model_fields_set and not settings.sentinels


def run(settings: Settings, console: Console, stop: StopSignals) -> int:
    redis: RedisServer | None = None
    children: list[Child] = []
    try:
        check_api_port_free(settings)
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        if needs_private_redis(settings):
            redis = start_private_redis(Path.cwd() / RUN_DIR_NAME)
            env["REDIS_URL"] = redis.url
        else:
            log.info("devrun.redis_given", extra=fields(url=redact(settings.redis_url)))
        if stop.requested.is_set():
            return 0
        apply_migrations(settings.database_url)
        log.info("devrun.migrated", extra=fields(database=redact(settings.database_url)))
        if stop.requested.is_set():
            return 0
        for name in COMPONENTS:
            process = spawn(name, env=env)
            assert process.stdout is not None
            pump = threading.Thread(
                target=pump_output, args=(name, process.stdout, console), daemon=True
            )
            children.append(Child(name=name, process=process, pump=pump))
        # Output threads start only now: every fork above happened single-threaded.
        for child in children:
            child.pump.start()
            log.info("devrun.started", extra=fields(component=child.name, pid=child.process.pid))
        stop.starting = False
        announce(console, settings)
        failure = supervise(children, redis, stop)
        if failure is None:
            log.info("devrun.stop_requested", extra=fields(signal=stop.signal_name))
            return 0
        log.error("devrun.failed", extra=fields(reason=failure))
        console.write("devrun", f"{failure}; stopping the others")
        return 1
    except (DevRunError, RedisServerError) as error:
        # An expected failure: the message says it all, a traceback would not help.
        log.error("devrun.failed", extra=fields(reason=str(error)))  # noqa: TRY400
        return 1
    except Exception:
        log.exception("devrun.failed")
        return 1
    finally:
        stop.starting = False
        stop_children(children, stop, settings)
        if redis is not None:
            redis.stop()
            log.info("devrun.redis_stopped", extra=fields(exit_code=redis.process.returncode))


def main() -> int:
    settings = load_settings()
    console = Console(sys.stdout)
    configure_console_logging(console, level=settings.log_level)
    stop = StopSignals()
    stop.install()
    try:
        return run(settings, console, stop)
    except KeyboardInterrupt:  # a second Ctrl-C while starting; run() cleaned up
        return 0


if __name__ == "__main__":
    sys.exit(main())
