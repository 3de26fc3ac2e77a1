"""Run the real components (`python -m api|relay|worker`) as subprocesses for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import ROOT


@dataclass(kw_only=True)
class Component:
    """One component process; its combined output goes to ``log_path``."""

    module: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, *, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 15.0) -> int:
        """Signal the process and wait for it; kill it if it outlives ``timeout_s``."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise AssertionError(
                    f"{self.module} ignored {sig.name} for {timeout_s}s:\n{self.output()[-3000:]}"
                ) from None
        return self.process.returncode

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@dataclass(kw_only=True)
class Cluster:
    """Starts components with one shared environment and stops them all at the end."""

    env: dict[str, str]
    log_dir: Path
    components: list[Component] = field(default_factory=list)

    def start(self, module: str, *, extra_env: Mapping[str, str] | None = None) -> Component:
        index = sum(1 for component in self.components if component.module == module)
        log_path = self.log_dir / f"{module.replace('.', '_')}-{index}.log"
        env = {**os.environ, **self.env, **(extra_env or {})}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", module],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        component = Component(module=module, process=process, log_path=log_path)
        self.components.append(component)
        return component

    def stop_all(self) -> None:
        for component in reversed(self.components):
            try:
                component.stop()
            except AssertionError:
                component.kill()


@contextmanager
def cluster(*, env: Mapping[str, str], log_dir: Path) -> Iterator[Cluster]:
    running = Cluster(env=dict(env), log_dir=log_dir)
    try:
        yield running
    finally:
        running.stop_all()
