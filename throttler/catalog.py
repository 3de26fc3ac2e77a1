"""The tasks the service accepts: each name with the input model both api and worker validate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_DURATION_S = 3600
MAX_URL_LENGTH = 2048


class TaskInput(BaseModel):
    """Base of task inputs: strict types, unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def limit_host(self) -> str | None:
        """The hostname ``host:`` limits apply to; None for tasks that contact no host."""
        return None


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("URL scheme must be http or https")
    if not parts.hostname:
        raise ValueError("URL must be absolute and name a host")
    return value


HttpUrl = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(_http_url)]


class GreetingInput(TaskInput):
    name: str = Field(min_length=1, max_length=200, description="Who to greet.")


class DownloadInput(TaskInput):
    url: HttpUrl = Field(description="Absolute http or https URL to fetch.")

    def limit_host(self) -> str | None:
        hostname = urlsplit(self.url).hostname
        return hostname.lower() if hostname else None


class DurationInput(TaskInput):
    duration: int = Field(ge=0, le=MAX_DURATION_S, description="Seconds to run.")


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskSpec:
    """What the api needs to know about a task kind."""

    name: str
    input_model: type[TaskInput]
    summary: str


GREETING = TaskSpec(name="greeting", input_model=GreetingInput, summary="Say hello to someone.")
DOWNLOAD = TaskSpec(
    name="download", input_model=DownloadInput, summary="Fetch a URL and report its digest."
)
BLOCKING_LONG_RUNNING = TaskSpec(
    name="blocking_long_running_task",
    input_model=DurationInput,
    summary="Block a worker thread for `duration` seconds.",
)
NON_BLOCKING_LONG_RUNNING = TaskSpec(
    name="non_blocking_long_running_task",
    input_model=DurationInput,
    summary="Sleep on the event loop for `duration` seconds.",
)

CATALOG: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (GREETING, DOWNLOAD, BLOCKING_LONG_RUNNING, NON_BLOCKING_LONG_RUNNING)
}
