"""FastAPI's own OpenTelemetry hooks are off unless an OpenTelemetry SDK is installed."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from fastapi import FastAPI

from api.app import fastapi_telemetry


def test_without_an_sdk_fastapis_telemetry_is_off() -> None:
    assert importlib.util.find_spec("opentelemetry.sdk") is None, "this venv has no SDK"
    options = fastapi_telemetry()
    assert options == {"telemetry": {"tracing": False, "metrics": False, "logs": False}}
    # FastAPI takes the option, and then never asks OpenTelemetry about a request.
    app = FastAPI(**options)
    assert not app._native_telemetry.enabled()


def test_with_an_sdk_fastapis_defaults_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any) -> Any:
        return object() if name == "opentelemetry.sdk" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert fastapi_telemetry() == {}
