"""Start a private PgBouncer in transaction pooling mode, for the tests and the benchmarks.

The binary is the system `pgbouncer` (Debian's package installs /usr/sbin/pgbouncer). It
listens on 127.0.0.1:<port> and passes every database name through to one PostgreSQL
server, with trust authentication for the users listed. PgBouncer refuses to run as root;
started as root, it switches to an unprivileged user (``user =``), so its files are made
readable by everyone.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from devtools.redis_server import free_port

INSTALL_HINT = "install PgBouncer (e.g. `apt-get install pgbouncer`)"
# Users PgBouncer may switch to when started as root, first found wins.
UNPRIVILEGED_USERS = ("nobody", "postgres")


class PgBouncerError(RuntimeError):
    """No pgbouncer binary was found, or it did not come up."""


def find_pgbouncer() -> str:
    """Return the pgbouncer binary: the one on PATH, else Debian's /usr/sbin/pgbouncer."""
    found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if not found:
        raise PgBouncerError(f"no pgbouncer binary: {INSTALL_HINT}")
    return found


@dataclass(kw_only=True)
class PgBouncer:
    """A pgbouncer child process listening on 127.0.0.1:port."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, database_url: str) -> str:
        """``database_url`` (same user and database) reached through this PgBouncer."""
        parts = urlsplit(database_url)
        user = f"{parts.username}@" if parts.username else ""
        return parts._replace(netloc=f"{user}127.0.0.1:{self.port}").geturl()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_pgbouncer(
    *,
    server_url: str,
    workdir: Path,
    pool_size: int = 2,
    pool_mode: str = "transaction",
    max_client_conn: int = 500,
    startup_timeout_s: float = 10.0,
) -> PgBouncer:
    """Start pgbouncer in front of ``server_url``'s server; wait until it accepts connections.

    ``pool_size`` server connections per database and user are shared by all clients.
    """
    binary = find_pgbouncer()  # first: without one, nothing is created
    server = urlsplit(server_url)
    user = server.username or "postgres"
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    userlist = workdir / "userlist.txt"
    userlist.write_text(f'"{user}" ""\n')
    log_path = workdir / f"pgbouncer-{port}.log"
    lines = [
        "[databases]",
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}",
        "[pgbouncer]",
        "listen_addr = 127.0.0.1",
        f"listen_port = {port}",
        "unix_socket_dir =",
        "auth_type = trust",
        f"auth_file = {userlist}",
        f"pool_mode = {pool_mode}",
        f"default_pool_size = {pool_size}",
        "min_pool_size = 0",
        "reserve_pool_size = 0",
        f"max_client_conn = {max_client_conn}",
        "log_connections = 0",
        "log_disconnections = 0",
    ]
    if os.geteuid() == 0:
        lines.append(f"user = {_unprivileged_user()}")
    config = workdir / "pgbouncer.ini"
    config.write_text("\n".join(lines) + "\n")
    for path in (workdir, userlist, config):
        path.chmod(0o755 if path.is_dir() else 0o644)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [binary, str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir
        )
    bouncer = PgBouncer(port=port, process=process, log_path=log_path)
    deadline = time.monotonic() + startup_timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PgBouncerError(
                f"pgbouncer exited with {process.returncode}: {bouncer.output()[-2000:]}"
            )
        if _accepts(port):
            return bouncer
        time.sleep(0.02)
    bouncer.stop()
    raise PgBouncerError(f"pgbouncer did not listen on port {port} in {startup_timeout_s}s")


def _unprivileged_user() -> str:
    for name in UNPRIVILEGED_USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise PgBouncerError(f"running as root and none of {UNPRIVILEGED_USERS} exists")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False
