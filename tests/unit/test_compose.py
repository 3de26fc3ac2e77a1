"""docker-compose.yml and the Dockerfile name real entry points and real settings."""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT
from throttler.settings import Settings

COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
# Services that run a third-party image: the command and environment belong to it.
THIRD_PARTY_IMAGES = {"redis": "redis:7-alpine", "postgres": "postgres:16-alpine"}
IMAGE_OWN_VARIABLES = {"postgres": "POSTGRES_"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}")


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
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
