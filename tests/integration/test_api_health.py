"""Probes and documentation: /healthz, /readyz, /docs and /openapi.json."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from throttler.catalog import CATALOG
from throttler.settings import Settings

if TYPE_CHECKING:
    from tests.integration.conftest import ApiClientFactory


async def test_healthz_and_readyz_answer_ok(api_client: httpx.AsyncClient) -> None:
    health = await api_client.get("/healthz")
    ready = await api_client.get("/readyz")

    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert (ready.status_code, ready.json()) == (
        200,
        {"status": "ok", "database": "ok", "redis": "ok"},
    )


async def test_readyz_is_503_naming_redis_when_redis_is_unreachable(
    settings: Settings, make_api_client: ApiClientFactory, closed_port: int
) -> None:
    no_redis = Settings(
        database_url=settings.database_url, redis_url=f"redis://127.0.0.1:{closed_port}/0"
    )
    async with make_api_client(no_redis) as client:
        ready = await client.get("/readyz")
        health = await client.get("/healthz")

    body = ready.json()
    assert (ready.status_code, body.pop("reason").split(":")[0]) == (503, "redis")
    assert body == {"status": "unavailable", "database": "ok", "redis": "unavailable"}
    assert health.status_code == 200


async def test_submissions_are_accepted_while_redis_is_down(
    settings: Settings, make_api_client: ApiClientFactory, closed_port: int
) -> None:
    # The outbox is SQL: intake must not depend on Redis.
    no_redis = Settings(
        database_url=settings.database_url, redis_url=f"redis://127.0.0.1:{closed_port}/0"
    )
    async with make_api_client(no_redis) as client:
        answer = await client.post("/api/v1/task/greeting", json={"name": "Ada"})
        view = await client.get(answer.headers["location"])

    assert answer.status_code == 202
    assert view.json()["status"] == "pending"


async def test_readyz_is_503_naming_the_database_when_it_is_unreachable(
    redis_url: str, make_api_client: ApiClientFactory, closed_port: int
) -> None:
    no_database = Settings(
        database_url=f"postgresql+asyncpg://postgres@127.0.0.1:{closed_port}/none",
        redis_url=redis_url,
        database_timeout_s=1.0,
    )
    async with make_api_client(no_database) as client:
        ready = await client.get("/readyz")

    body = ready.json()
    assert (ready.status_code, body.pop("reason").split(":")[0]) == (503, "database")
    assert body == {"status": "unavailable", "database": "unavailable", "redis": "ok"}


async def test_openapi_documents_every_task_with_its_schema(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get("/openapi.json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    for spec in CATALOG.values():
        operation = paths[f"/api/v1/task/{spec.name}"]["post"]
        schema_ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert schema_ref.endswith(f"/{spec.input_model.__name__}")
        assert {"202", "401", "413", "422", "503"} <= set(operation["responses"])
        assert "Location" in operation["responses"]["202"]["headers"]
    result = paths["/api/v1/task/result/{task_id}"]["get"]
    assert {"200", "401", "404", "503"} <= set(result["responses"])
    assert set(paths) >= {"/healthz", "/readyz"}


async def test_docs_page_is_served(api_client: httpx.AsyncClient) -> None:
    response = await api_client.get("/docs")

    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "/openapi.json" in response.text
