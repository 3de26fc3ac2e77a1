"""Production-like Redis servers for tests: TLS with client certificates, ACL users, Sentinel.

Each is a real ``redis-server`` child process on its own port (Sentinel too: the plain
binary with ``--sentinel``), started and waited for here; certificates come from the
``openssl`` command line.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from devtools.redis_server import find_redis_server, free_port
from tests.acceptance.processes import Cluster, Component
from tests.support import wait_for

START_TIMEOUT_S = 10.0


@dataclass(kw_only=True)
class RedisProcess:
    """One redis-server (or sentinel) child; its output goes to ``log_path``."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

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

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_redis(
    arguments: Sequence[str],
    *,
    port: int,
    workdir: Path,
    name: str,
    ready: Callable[[], bool],
) -> RedisProcess:
    """Start ``redis-server ARGUMENTS`` (no persistence) and wait until ``ready()``."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [find_redis_server(), *arguments, "--dir", str(workdir), "--daemonize", "no"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = RedisProcess(port=port, process=process, log_path=log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = server.output()
            if "Bad directive" in output and "tls" in output:
                pytest.skip(f"this redis-server has no TLS support: {output.strip()[-300:]}")
            raise AssertionError(f"{name} exited with {process.returncode}: {output[-2000:]}")
        if ready():
            return server
        time.sleep(0.05)
    server.stop()
    raise AssertionError(f"{name} did not come up in {START_TIMEOUT_S}s: {server.output()[-2000:]}")


def answers(**client: object) -> Callable[[], bool]:
    """A readiness check: a redis-py client made of ``client`` gets PONG."""

    def check() -> bool:
        connection = redis.Redis(socket_connect_timeout=0.5, socket_timeout=0.5, **client)  # type: ignore[arg-type]
        try:
            return bool(connection.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            connection.close()

    return check


# --- TLS ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class Certificates:
    """A CA, a server and a client certificate it signed, and a CA that signed neither."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=cwd, check=True, capture_output=True)


def _new_ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
        "ec_paramgen_curve:prime256v1", "-keyout", f"{name}.key", "-out", f"{name}.crt",
        "-days", "2", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip


def _signed(name: str, *, ca: str, extensions: str, cwd: Path) -> None:
    _openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


def make_certificates(directory: Path) -> Certificates:
    """Generate everything a TLS test needs (skip the test without ``openssl``)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS tests need the openssl command line to make certificates")
    directory.mkdir(parents=True, exist_ok=True)
    _new_ca("ca", directory)
    _new_ca("other-ca", directory)
    _signed(
        "server",
        ca="ca",
        extensions=(
            # clientAuth too: a replica presents it to its master, a sentinel to the nodes.
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth"
        ),
        cwd=directory,
    )
    _signed("client", ca="ca", extensions="extendedKeyUsage=clientAuth", cwd=directory)
    return Certificates(
        ca=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.crt",
    )


def start_tls_redis(certificates: Certificates, *, workdir: Path) -> RedisProcess:
    """A Redis speaking TLS only, that asks every client for a certificate signed by the CA."""
    port = free_port()
    arguments = [
        "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(certificates.server_cert),
        "--tls-key-file", str(certificates.server_key),
        "--tls-ca-cert-file", str(certificates.ca),
        "--tls-auth-clients", "yes",
        "--save", "", "--appendonly", "no",
    ]  # fmt: skip
    return start_redis(
        arguments,
        port=port,
        workdir=workdir,
        name=f"redis-tls-{port}",
        ready=answers(
            host="127.0.0.1",
            port=port,
            ssl=True,
            ssl_ca_certs=str(certificates.ca),
            ssl_certfile=str(certificates.client_cert),
            ssl_keyfile=str(certificates.client_key),
        ),
    )


# --- ACL ---------------------------------------------------------------------------------


def start_acl_redis(*, user: str, password: str, workdir: Path) -> RedisProcess:
    """A Redis whose default user is off: only ``user`` with ``password`` gets in."""
    port = free_port()
    arguments = [
        "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        "--user", user, "on", f">{password}", "~*", "&*", "+@all",
        "--user", "default", "off",
    ]  # fmt: skip
    return start_redis(
        arguments,
        port=port,
        workdir=workdir,
        name=f"redis-acl-{port}",
        ready=answers(host="127.0.0.1", port=port, username=user, password=password),
    )


# --- the components over such a Redis ----------------------------------------------------


def stack_env(database_url: str, redis_url: str, api_port: int, **extra: str) -> dict[str, str]:
    """The environment of api, relay and worker processes sharing one database and Redis."""
    return {
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(api_port),
        "LOG_LEVEL": "INFO",
        **extra,
    }


async def greetings_succeed(
    http: httpx.AsyncClient, running: Cluster, *, count: int, timeout_s: float = 60
) -> None:
    """Wait for the api to be ready, submit ``count`` greetings, wait until all succeeded."""

    def check_alive() -> None:
        for component in running.components:
            if component.process.poll() is not None:
                raise AssertionError(f"{component.module} exited:\n{component.output()[-3000:]}")

    async def ready() -> bool:
        check_alive()
        try:
            return (await http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    await wait_for(ready, timeout_s=60, message="the api to be ready")
    task_ids = []
    for index in range(count):
        answer = await http.post("/api/v1/task/greeting", json={"name": f"n{index}"})
        assert answer.status_code == 202, answer.text
        task_ids.append(answer.json()["task_id"])

    async def all_succeeded() -> bool:
        check_alive()
        views = [(await http.get(f"/api/v1/task/result/{i}")).json() for i in task_ids]
        failed = [view for view in views if view["status"] in ("failed", "cancelled")]
        assert not failed, failed
        return all(view["status"] == "succeeded" for view in views)

    await wait_for(all_succeeded, timeout_s=timeout_s, interval_s=0.2, message="greetings to run")


def exits_with(component: Component, *, timeout_s: float = 30) -> int:
    """Wait for ``component`` to exit by itself; its exit status."""
    try:
        return component.process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        component.kill()
        raise AssertionError(
            f"{component.module} still running after {timeout_s}s (a hang, not an error):\n"
            + component.output()[-3000:]
        ) from None


# --- Sentinel ----------------------------------------------------------------------------

SENTINEL_SERVICE = "throttler"
# Sentinel judges the master down after this much silence; failover follows within ~1 s.
DOWN_AFTER_MS = 1000


@dataclass(kw_only=True)
class SentinelGroup:
    """A master, one replica and the sentinels watching them (quorum: a majority)."""

    master: RedisProcess
    replica: RedisProcess
    sentinels: list[RedisProcess]
    # How a client connects to any of them (TLS keywords, or nothing).
    client_options: dict[str, Any] = field(default_factory=dict)

    @property
    def setting(self) -> str:
        """REDIS_SENTINELS for this group."""
        return ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers sees it."""
        for sentinel in self.sentinels:
            client = _client(sentinel.port, self.client_options)
            try:
                address = client.sentinel_get_master_addr_by_name(SENTINEL_SERVICE)  # type: ignore[no-untyped-call]
            except (redis.RedisError, OSError):
                continue
            finally:
                client.close()
            if address:
                return int(address[1])
        return None

    def stop(self) -> None:
        for process in [*self.sentinels, self.replica, self.master]:
            process.stop()


def _client(port: int, options: dict[str, Any]) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port, socket_timeout=0.5, **options)


def _tls_client_options(certificates: Certificates) -> dict[str, Any]:
    return {
        "ssl": True,
        "ssl_ca_certs": str(certificates.ca),
        "ssl_certfile": str(certificates.client_cert),
        "ssl_keyfile": str(certificates.client_key),
    }


def _watching(
    port: int, options: dict[str, Any], *, replicas: int, sentinels: int
) -> Callable[[], bool]:
    """A readiness check: this sentinel sees the master, its replica and the others."""

    def check() -> bool:
        client = _client(port, options)
        try:
            state: dict[str, Any] = client.sentinel_master(SENTINEL_SERVICE)  # type: ignore[no-untyped-call]
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()
        return (
            int(state.get("num-slaves", 0)) >= replicas
            and int(state.get("num-other-sentinels", 0)) >= sentinels - 1
        )

    return check


def start_sentinel_group(
    workdir: Path, *, sentinel_count: int = 3, tls: Certificates | None = None
) -> SentinelGroup:
    """Start the group and wait until every sentinel knows the replica and the others.

    With ``tls`` every node and sentinel speaks TLS only (replication and the sentinels'
    own links too) and asks each client for a certificate.
    """
    options = _tls_client_options(tls) if tls is not None else {}

    def listen(port: int) -> list[str]:
        if tls is None:
            return ["--port", str(port)]
        return [
            "--port", "0", "--tls-port", str(port),
            "--tls-cert-file", str(tls.server_cert), "--tls-key-file", str(tls.server_key),
            "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes",
            "--tls-replication", "yes",
        ]  # fmt: skip

    common = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    master_port = free_port()
    master = start_redis(
        [*listen(master_port), *common],
        port=master_port,
        workdir=workdir / "master",
        name="master",
        ready=answers(host="127.0.0.1", port=master_port, **options),
    )
    replica_port = free_port()
    replica = start_redis(
        [*listen(replica_port), *common, "--replicaof", "127.0.0.1", str(master_port)],
        port=replica_port,
        workdir=workdir / "replica",
        name="replica",
        ready=_replicating(replica_port, options),
    )
    sentinels = []
    quorum = sentinel_count // 2 + 1
    for index in range(sentinel_count):
        port = free_port()
        directory = workdir / f"sentinel-{index}"
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "sentinel.conf"  # sentinel rewrites it: a file of its own
        words = listen(port)
        # The same options as a config file: "--name value" becomes "name value".
        lines = [
            f"{name.removeprefix('--')} {value}"
            for name, value in zip(words[::2], words[1::2], strict=True)
        ]
        config.write_text(
            "\n".join(lines) + "\nbind 127.0.0.1\n"
            f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {master_port} {quorum}\n"
            f"sentinel down-after-milliseconds {SENTINEL_SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SENTINEL_SERVICE} 10000\n"
            f"sentinel parallel-syncs {SENTINEL_SERVICE} 1\n"
        )
        sentinels.append(
            start_redis(
                [str(config), "--sentinel"],
                port=port,
                workdir=directory,
                name=f"sentinel-{index}",
                ready=answers(host="127.0.0.1", port=port, **options),
            )
        )
    group = SentinelGroup(
        master=master, replica=replica, sentinels=sentinels, client_options=options
    )
    # Sentinels find the replica and each other through the master (hellos every 2 s).
    deadline = time.monotonic() + 30
    checks = [_watching(s.port, options, replicas=1, sentinels=len(sentinels)) for s in sentinels]
    while not all(check() for check in checks):
        if time.monotonic() > deadline:
            group.stop()
            logs = "\n".join(s.output()[-1000:] for s in sentinels)
            raise AssertionError(f"the sentinels did not find each other in 30 s:\n{logs}")
        time.sleep(0.2)
    return group


def _replicating(port: int, options: dict[str, Any]) -> Callable[[], bool]:
    def check() -> bool:
        client = _client(port, options)
        try:
            info = cast(dict[str, Any], client.info("replication"))
            return info.get("master_link_status") == "up"
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    return check


def sqlite_copy(template: Path, directory: Path) -> str:
    """A migrated SQLite database of its own: Redis's settings do not depend on the database,
    so the TLS and ACL tests run on SQLite only (the failover test runs on both)."""
    path = directory / "test.db"
    shutil.copyfile(template, path)
    return f"sqlite+aiosqlite:///{path}"
