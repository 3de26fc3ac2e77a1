"""Property-based fuzzing of the whole API from its own OpenAPI schema (schemathesis).

Valid and invalid requests alike must never get a 5xx, and every answer must be one the
schema documents: status code, content type, headers and body.
"""

from __future__ import annotations

import itertools
import shutil
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from throttler.settings import Settings

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Per operation and mode (valid and invalid requests); the run stays well under 30 s.
MAX_EXAMPLES = 25


@pytest.fixture
def api_schema(tmp_path: Path, sqlite_template: Path, redis_url: str) -> BaseSchema:
    """The app's schema, bound to the app on a fresh SQLite file and the test Redis."""
    database = tmp_path / "fuzz.db"
    shutil.copyfile(sqlite_template, database)
    app = create_app(Settings(database_url=f"sqlite+aiosqlite:///{database}", redis_url=redis_url))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_api_conforms_to_its_schema_and_never_fails(api_schema: BaseSchema) -> None:
    # One Hypothesis run per operation and mode, so each gets its share of examples. (schemathesis'
    # own ``from_fixture(...).parametrize()`` does not work with pytest 9: it reads
    # ``node._nodeid``.)
    operations = []
    for result in api_schema.get_all_operations():
        if not isinstance(result, Ok):
            pytest.fail(f"schema operation does not load: {result.err()}")
        operations.append(result.ok())
    assert len(operations) >= 6
    for operation, mode in itertools.product(operations, GenerationMode):

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Case[Any]) -> None:
            case.call_and_validate(checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            # An operation without parameters or body (the health probes) has no invalid
            # request to generate.
            if mode is not GenerationMode.NEGATIVE:
                raise
