"""api, relay and worker as an ACL user of a Redis whose default user is off."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from devtools.redis_server import free_port
from tests.acceptance.processes import cluster
from tests.acceptance.redis_servers import (
    exits_with,
    greetings_succeed,
    sqlite_copy,
    stack_env,
    start_acl_redis,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def database_url(sqlite_template: Path, tmp_path: Path) -> str:
    return sqlite_copy(sqlite_template, tmp_path)


USER = "app"
PASSWORD = "s3cret/+@:pass"  # special characters on purpose: percent-encoded in the URL
WRONG = "not-the-Pa55word"


def _url(password: str, port: int) -> str:
    # Special characters percent-encoded, as in any URL.
    return f"redis://{USER}:{quote(password, safe='')}@127.0.0.1:{port}/0"


async def test_tasks_run_as_an_acl_user(database_url: str, tmp_path: Path) -> None:
    server = start_acl_redis(user=USER, password=PASSWORD, workdir=tmp_path / "redis")
    api_port = free_port()
    env = stack_env(database_url, _url(PASSWORD, server.port), api_port)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as http:
            with cluster(env=env, log_dir=tmp_path) as running:
                for module in ("api", "relay", "worker"):
                    running.start(module)
                await greetings_succeed(http, running, count=20)
                outputs = [component.output() for component in running.components]
    finally:
        server.stop()
    for output in outputs:
        assert PASSWORD not in output
        assert quote(PASSWORD, safe="") not in output


async def test_a_wrong_password_stops_every_component_without_echoing_it(
    database_url: str, tmp_path: Path
) -> None:
    server = start_acl_redis(user=USER, password=PASSWORD, workdir=tmp_path / "redis")
    env = stack_env(database_url, _url(WRONG, server.port), free_port())
    try:
        with cluster(env=env, log_dir=tmp_path) as running:
            components = [running.start(module) for module in ("relay", "worker", "api")]
            for component in components:
                status = exits_with(component)
                output = component.output()
                assert status != 0, output[-3000:]
                assert "refused the credentials of REDIS_URL (user 'app'" in output, output
                assert WRONG not in output, output
            assert [c.process.returncode for c in components[:2]] == [2, 2]
    finally:
        server.stop()
