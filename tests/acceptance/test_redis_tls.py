"""api, relay and worker over ``rediss://`` to a Redis that demands client certificates.

The CA, server and client certificates are made for each test with openssl; the server
is a real ``redis-server`` speaking TLS only (``--port 0``, ``--tls-auth-clients yes``).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from devtools.redis_server import free_port
from tests.acceptance.processes import cluster
from tests.acceptance.redis_servers import (
    SENTINEL_SERVICE,
    Certificates,
    exits_with,
    greetings_succeed,
    make_certificates,
    sqlite_copy,
    stack_env,
    start_sentinel_group,
    start_tls_redis,
)
from throttler.redis_conn import connect_arq, redis_client
from throttler.settings import Settings

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def database_url(sqlite_template: Path, tmp_path: Path) -> str:
    return sqlite_copy(sqlite_template, tmp_path)


def _tls_env(
    database_url: str, port: int, api_port: int, certificates: Certificates, *, ca: Path
) -> dict[str, str]:
    return stack_env(
        database_url,
        f"rediss://127.0.0.1:{port}/0",
        api_port,
        REDIS_TLS_CA_FILE=str(ca),
        REDIS_TLS_CERT_FILE=str(certificates.client_cert),
        REDIS_TLS_KEY_FILE=str(certificates.client_key),
    )


async def test_tasks_run_over_tls_with_client_certificates(
    database_url: str, tmp_path: Path
) -> None:
    certificates = make_certificates(tmp_path / "certs")
    server = start_tls_redis(certificates, workdir=tmp_path / "redis")
    api_port = free_port()
    env = _tls_env(database_url, server.port, api_port, certificates, ca=certificates.ca)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as http:
            with cluster(env=env, log_dir=tmp_path) as running:
                for module in ("api", "relay", "worker"):
                    running.start(module)
                await greetings_succeed(http, running, count=20)
    finally:
        server.stop()


async def test_a_wrong_ca_stops_every_component_at_once_naming_the_setting(
    database_url: str, tmp_path: Path
) -> None:
    certificates = make_certificates(tmp_path / "certs")
    server = start_tls_redis(certificates, workdir=tmp_path / "redis")
    env = _tls_env(database_url, server.port, free_port(), certificates, ca=certificates.other_ca)
    try:
        with cluster(env=env, log_dir=tmp_path) as running:
            components = [running.start(module) for module in ("relay", "worker", "api")]
            for component in components:
                status = exits_with(component)
                output = component.output()
                assert status != 0, output[-3000:]
                assert f"REDIS_TLS_CA_FILE={certificates.other_ca}" in output, output[-3000:]
                assert "did not verify" in output, output[-3000:]
                assert f"{component.module}.redis_misconfigured" in output, output[-3000:]
            # The relay and the worker say it in one line and exit 2 (api: uvicorn's 3).
            assert [c.process.returncode for c in components[:2]] == [2, 2]
    finally:
        server.stop()


async def test_the_factory_reaches_a_tls_master_through_tls_sentinels(tmp_path: Path) -> None:
    """ARQ's own Sentinel support passes no CA or client certificate: ours does."""
    certificates = make_certificates(tmp_path / "certs")
    group = start_sentinel_group(tmp_path / "redis", sentinel_count=1, tls=certificates)
    settings = Settings(
        redis_url="rediss://ignored/0",
        redis_tls_ca_file=certificates.ca,
        redis_tls_cert_file=certificates.client_cert,
        redis_tls_key_file=certificates.client_key,
        redis_sentinels=group.setting,
        redis_sentinel_service=SENTINEL_SERVICE,
    )
    arq = await connect_arq(settings)
    client = redis_client(settings)
    try:
        job = await arq.enqueue_job("greeting", _job_id="through-sentinel")
        assert job is not None
        assert await client.exists("arq:job:through-sentinel") == 1
        assert (await client.info("replication"))["role"] == "master"
        assert client.connection_pool.master_address == ("127.0.0.1", group.master.port)  # type: ignore[attr-defined]
    finally:
        await client.aclose()
        await arq.aclose()
        group.stop()
