"""The API process(es): one serving in place, or ``API_WORKERS`` children on one port.

Every serving process is set up the same way (``prepare_process``, then ``gc.freeze()``
once the app is built, and the bounded httptools protocol of ``api.http_limits``), and
has its own app: its own engine, group committer (``api.intake``), Redis clients and
metrics registry.

With ``API_WORKERS`` above 1 the process started binds the port and supervises that many
children with uvicorn's ``Multiprocess`` (each child is a fresh interpreter, "spawn",
sharing the listening socket; the kernel hands each new connection to one of them):

- SIGTERM or SIGINT: each child gets SIGTERM, finishes its in-flight requests, flushes
  its group committer and closes (the app's lifespan), and the parent exits 0 once every
  child has ended. SIGHUP replaces the children one at a time; SIGTTIN/SIGTTOU add or
  remove one (uvicorn's own).
- A child that dies while serving (killed, out of memory) is logged as an error and
  replaced, as gunicorn does: the others keep serving meanwhile.
- A child that fails to start (its lifespan raised: say the database is unreachable)
  stops the whole service with exit code 3: a replacement would fail the same way.
- A child whose parent is gone (killed with SIGKILL, so it could not stop them) stops
  itself, as on SIGTERM: no orphan keeps the port.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from api.app import create_app
from api.http_limits import HeadLimits, bounded_protocol
from throttler.logs import configure_logging, fields
from throttler.settings import Settings, load_settings

log = logging.getLogger(__name__)

SWITCH_INTERVAL_S = 0.001
# What each child imports and calls to build its app (``API_WORKERS`` above 1).
CHILD_APP = "api.workers:child_app"
# How long a child may take to answer the supervisor's ping before it is deemed hung,
# killed and replaced. uvicorn's 5 s default also covers a new child's imports, which
# took longer than that on this loaded 2-core machine: every child was killed mid-start.
HEALTHCHECK_TIMEOUT_S = 30


def prepare_process(settings: Settings) -> None:
    """What every serving process sets before building its app."""
    # The intake writer's thread (the store's fast path for a database file) takes the GIL
    # back a few times per batch; while the event loop is busy, each wait lasts up to the
    # switch interval, 5 ms by default. 1 ms measured 25-60% more submissions per second
    # under load.
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    configure_logging(component="api", level=settings.log_level)


def freeze_heap() -> None:
    """Call once the app is built, just before serving."""
    # Everything loaded so far (FastAPI, pydantic, SQLAlchemy, the app) lives as long as
    # the process: out of the collector's sight, a full collection no longer walks it,
    # which under load cut the 99th percentile from about 70 ms to about 22 ms.
    gc.freeze()


def server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's settings, the same for one process or several."""
    return {
        "host": settings.api_host,
        "port": settings.api_port,
        "log_config": None,  # keep the key=value handler configure_logging installed
        "server_header": False,
        "timeout_keep_alive": settings.api_keep_alive_s,
    }


def serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, in this process or in ``settings.api_workers``."""
    if settings.api_workers == 1:
        _serve_here(settings)
    else:
        _supervise(settings)


def _serve_here(settings: Settings) -> None:
    prepare_process(settings)
    app = create_app(settings)
    freeze_heap()
    # uvicorn finishes in-flight requests and runs the lifespan shutdown on SIGTERM/SIGINT.
    uvicorn.run(
        app,
        **server_options(settings),
        # httptools' speed, with bounds on each request head's size and time.
        http=bounded_protocol(HeadLimits.of(settings)),
    )


class ChildConfig(uvicorn.Config):
    """uvicorn's config as pickled to each child: the protocol class is made there.

    ``bounded_protocol`` makes its class at run time, which pickle cannot carry; the
    limits it needs can, so the child's ``load`` (run before it serves) makes the class.
    """

    def __init__(self, *, limits: HeadLimits, **options: Any) -> None:
        super().__init__(**options)
        self.head_limits = limits

    def load(self) -> None:
        super().load()
        self.http_protocol_class = bounded_protocol(self.head_limits)


class Supervisor(Multiprocess):
    """uvicorn's supervisor, saying loudly when a child died while serving."""

    def keep_subprocess_alive(self) -> None:
        if not self.should_exit.is_set():
            for process in self.processes:
                code = process.exitcode
                if code is not None and code != STARTUP_FAILURE:
                    log.error(
                        "api.process_died",
                        extra=fields(pid=process.pid, exit_code=code, action="replacing it"),
                    )
        super().keep_subprocess_alive()


def _supervise(settings: Settings) -> None:
    prepare_process(settings)
    config = ChildConfig(
        app=CHILD_APP,
        factory=True,
        workers=settings.api_workers,
        http="httptools",
        timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT_S,
        limits=HeadLimits.of(settings),
        **server_options(settings),
    )
    sock = config.bind_socket()
    log.info(
        "api.supervising",
        extra=fields(pid=os.getpid(), processes=settings.api_workers, port=settings.api_port),
    )
    supervisor = Supervisor(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
    failed = [
        process.pid for process in supervisor.processes if process.exitcode == STARTUP_FAILURE
    ]
    if failed:
        log.error("api.startup_failed", extra=fields(pids=failed, exit_code=STARTUP_FAILURE))
        raise SystemExit(STARTUP_FAILURE)
    log.info("api.stopped", extra=fields(pid=os.getpid()))


def child_app() -> FastAPI:
    """Build one child's app (uvicorn calls this in the child, before it serves)."""
    settings = load_settings()
    prepare_process(settings)
    app = create_app(settings)
    _stop_with_parent()
    freeze_heap()
    return app


def _stop_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:  # not started by the supervisor (say, a test calling child_app)
        return

    def watch() -> None:
        parent.join()  # returns once the parent has exited, however it ended
        log.error("api.parent_gone", extra=fields(pid=os.getpid(), action="stopping"))
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
