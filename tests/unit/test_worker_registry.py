"""Task classes become ARQ functions named for the catalog, with ARQ's limits above ours."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import BaseModel

from throttler.catalog import CATALOG, GREETING, GreetingInput
from throttler.settings import Settings
from worker.taskkit import Resources, RetriableTask, TaskBase, build_functions
from worker.taskkit.definition import define_task
from worker.taskkit.registry import ARQ_TRIES_HEADROOM
from worker.tasks import DEFAULT_TASKS
from worker.tasks.greeting import GreetingOutput


@pytest.fixture
def settings() -> Settings:
    return Settings(task_timeout_s=42.0, worker_max_tries=4)


class Unknown(
    RetriableTask[GreetingInput, GreetingOutput],
    spec=dataclasses.replace(GREETING, name="not_in_catalog"),
):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        raise NotImplementedError


class Quick(
    RetriableTask[GreetingInput, GreetingOutput],
    spec=dataclasses.replace(GREETING, timeout_s=1.5, max_tries=2),
):
    output_model = GreetingOutput

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        raise NotImplementedError


class NoOutput(RetriableTask[GreetingInput, GreetingOutput], spec=GREETING):
    output_model = dict  # type: ignore[assignment]

    async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
        raise NotImplementedError


def test_default_tasks_cover_the_catalog(settings: Settings) -> None:
    functions = build_functions(DEFAULT_TASKS, settings=settings)
    assert sorted(function.name for function in functions) == sorted(CATALOG)


def test_defaults_come_from_settings_and_arq_limits_stay_above_ours(
    settings: Settings,
) -> None:
    functions = {f.name: f for f in build_functions(DEFAULT_TASKS, settings=settings)}
    greeting = functions["greeting"]
    assert greeting.max_tries == 4 + ARQ_TRIES_HEADROOM
    assert greeting.timeout_s is not None
    assert greeting.timeout_s > 42.0
    definition = define_task(DEFAULT_TASKS[0], settings=settings)
    assert (definition.timeout_s, definition.max_tries) == (42.0, 4)
    assert definition.input_model is CATALOG["greeting"].input_model


def test_spec_limits_override_settings(settings: Settings) -> None:
    definition = define_task(Quick, settings=settings)
    assert (definition.timeout_s, definition.max_tries) == (1.5, 2)
    assert not definition.at_most_once


@pytest.mark.parametrize(
    ("classes", "error", "match"),
    [
        ([Unknown], ValueError, "not_in_catalog"),
        ([NoOutput], TypeError, "output_model"),
        ([Quick, Quick], ValueError, "two task classes"),
        ([TaskBase], ValueError, "abstract"),
    ],
)
def test_bad_task_classes_are_rejected_early(
    settings: Settings, classes: list[type[TaskBase[Any, Any]]], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        build_functions(classes, settings=settings)


def test_output_models_are_pydantic() -> None:
    for task_class in DEFAULT_TASKS:
        assert issubclass(task_class.output_model, BaseModel)
