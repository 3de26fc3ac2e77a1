"""The catalog is the one source of task metadata: task classes are built from it, and a
class that disagrees with it fails when it is defined or registered."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from throttler.catalog import (
    BLOCKING_LONG_RUNNING,
    CATALOG,
    GREETING,
    LONG_RUNNING_TIMEOUT_S,
    DurationInput,
    GreetingInput,
)
from throttler.settings import Settings
from worker.taskkit import BlockingTask, Resources, RetriableTask, SideEffectingTask, TaskBase
from worker.taskkit.definition import check_catalog_tasks, define_task
from worker.tasks import DEFAULT_TASKS
from worker.tasks.greeting import Greeting, GreetingOutput
from worker.tasks.long_running import DurationOutput

SETTINGS = Settings(task_timeout_s=42.0, worker_max_tries=4)


def test_each_default_task_runs_its_catalog_entry_itself() -> None:
    assert {task_class.name: task_class.spec for task_class in DEFAULT_TASKS} == CATALOG
    for task_class in DEFAULT_TASKS:
        assert task_class.spec is CATALOG[task_class.name]


def test_the_definition_takes_every_limit_from_the_spec() -> None:
    blocking = next(t for t in DEFAULT_TASKS if t.spec is BLOCKING_LONG_RUNNING)
    definition = define_task(blocking, settings=SETTINGS)
    assert definition.timeout_s == LONG_RUNNING_TIMEOUT_S
    assert definition.max_tries == 4  # the spec leaves it to WORKER_MAX_TRIES
    assert definition.input_model is DurationInput
    assert not definition.at_most_once


@pytest.mark.parametrize(
    ("side_effecting", "retry_side_effects", "at_most_once"),
    [(False, False, False), (True, False, True), (True, True, False)],
)
def test_at_most_once_comes_from_the_spec(
    side_effecting: bool, retry_side_effects: bool, at_most_once: bool
) -> None:
    spec = dataclasses.replace(
        GREETING, side_effecting=side_effecting, retry_side_effects=retry_side_effects
    )

    class Variant(TaskBase[GreetingInput, GreetingOutput], spec=spec):
        output_model = GreetingOutput

        async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
            raise NotImplementedError

    assert define_task(Variant, settings=SETTINGS).at_most_once is at_most_once


@pytest.mark.parametrize(
    ("attribute", "value"),
    [("name", "greeting"), ("timeout_s", 1.0), ("max_tries", 2), ("side_effecting", True)],
)
def test_a_class_that_sets_a_spec_field_itself_is_refused_when_defined(
    attribute: str, value: object
) -> None:
    # As the task classes did before the catalog held their limits.
    with pytest.raises(TypeError, match=f"sets {attribute} itself"):
        type("Drifted", (Greeting,), {attribute: value})


def test_a_retriable_class_with_a_side_effecting_spec_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match="RetriableTask but its spec 'greeting' says"):

        class Mislabelled(
            RetriableTask[GreetingInput, GreetingOutput],
            spec=dataclasses.replace(GREETING, side_effecting=True),
        ):
            output_model = GreetingOutput


def test_a_side_effecting_class_with_a_retriable_spec_is_refused_when_defined() -> None:
    with pytest.raises(TypeError, match="SideEffectingTask but its spec 'greeting' says"):

        class Mislabelled(SideEffectingTask[GreetingInput, GreetingOutput], spec=GREETING):
            output_model = GreetingOutput


def test_a_subclass_inherits_its_spec_and_may_replace_it() -> None:
    class Again(Greeting):
        pass

    class Slower(Greeting, spec=dataclasses.replace(GREETING, timeout_s=9.0)):
        pass

    assert Again.spec is GREETING
    assert (Slower.name, Slower.spec.timeout_s) == ("greeting", 9.0)
    assert Greeting.spec is GREETING


def test_the_input_model_must_be_the_one_the_api_validates_with() -> None:
    class WrongInput(
        BlockingTask[DurationInput, DurationOutput],
        spec=dataclasses.replace(GREETING, input_model=DurationInput),
    ):
        output_model = DurationOutput

        def run_blocking(self, params: DurationInput) -> DurationOutput:
            raise NotImplementedError

    with pytest.raises(ValueError, match="not the catalog's GreetingInput"):
        define_task(WrongInput, settings=SETTINGS)


def test_a_class_without_a_spec_is_refused() -> None:
    class Nameless(RetriableTask[GreetingInput, GreetingOutput]):
        output_model = GreetingOutput

        async def run(self, resources: Resources, params: GreetingInput) -> GreetingOutput:
            raise NotImplementedError

    with pytest.raises(ValueError, match="has no spec"):
        define_task(Nameless, settings=SETTINGS)


def test_the_production_list_must_use_the_catalog_entries_themselves() -> None:
    class Variant(Greeting, spec=dataclasses.replace(GREETING, max_tries=1)):
        pass

    others = [t for t in DEFAULT_TASKS if t is not Greeting]
    check_catalog_tasks(DEFAULT_TASKS)
    with pytest.raises(ValueError, match="not built from their catalog entry"):
        check_catalog_tasks([Variant, *others])
    with pytest.raises(ValueError, match="do not match the catalog"):
        check_catalog_tasks(others)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"timeout_s": 0.0}, "timeout_s must be > 0"),
        ({"max_tries": 0}, "max_tries must be >= 1"),
        ({"retry_side_effects": True}, "retry_side_effects needs side_effecting"),
    ],
)
def test_a_spec_with_impossible_limits_is_refused(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(GREETING, **changes)
