"""The tasks the service accepts: each name with the input model both api and worker validate."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from throttler.hosts import ip_literal, url_host_key

MAX_DURATION_S = 3600
MAX_URL_LENGTH = 2048
MAX_HOSTNAME_LENGTH = 253
MAX_LABEL_LENGTH = 63
# Every accepted duration must fit in the long-running tasks' time limit.
LONG_RUNNING_TIMEOUT_S: float = MAX_DURATION_S + 60


class TaskInput(BaseModel):
    """Base of task inputs: strict types, unknown fields rejected, immutable."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    def limit_host(self) -> str | None:
        """The hostname ``host:`` limits apply to; None for tasks that contact no host."""
        return None


def _has_invisible(value: str) -> bool:
    # Control characters (NUL included: PostgreSQL cannot store it) and format
    # characters such as U+202E, which make a string read differently than it is.
    return any(unicodedata.category(char) in ("Cc", "Cf", "Cs") for char in value)


def _plain_text(value: str) -> str:
    if _has_invisible(value):
        raise ValueError("must not contain control or format characters")
    return value


def _http_url(value: str) -> str:
    if _has_invisible(value) or any(char.isspace() for char in value):
        raise ValueError("URL must not contain whitespace, control or format characters")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https"):
        raise ValueError("URL scheme must be http or https")
    if not parts.hostname:
        raise ValueError("URL must be absolute and name a host")
    try:
        parts.port  # noqa: B018 - parsing it validates it
    except ValueError:
        raise ValueError("URL port must be a number from 0 to 65535") from None
    if "%" in parts.hostname:
        raise ValueError("URL host must not carry a zone id or percent-escapes")
    try:
        host = url_host_key(value)
    except ValueError as error:
        raise ValueError(f"URL host is not valid: {error}") from None
    if ip_literal(host) is None and (
        len(host) > MAX_HOSTNAME_LENGTH
        or any(not 0 < len(label) <= MAX_LABEL_LENGTH for label in host.split("."))
    ):
        raise ValueError(
            f"URL host must be at most {MAX_HOSTNAME_LENGTH} characters in labels of "
            f"1 to {MAX_LABEL_LENGTH}"
        )
    return value


HttpUrl = Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH), AfterValidator(_http_url)]
PlainText = Annotated[str, AfterValidator(_plain_text)]


class GreetingInput(TaskInput):
    name: PlainText = Field(min_length=1, max_length=200, description="Who to greet.")


class DownloadInput(TaskInput):
    url: HttpUrl = Field(description="Absolute http or https URL to fetch.")

    def limit_host(self) -> str | None:
        # The host the worker's client connects to: "EXAMPLE.com.", an IDN spelling or
        # "127.1" must not escape a host: limit written for its canonical key.
        return url_host_key(self.url)


class DurationInput(TaskInput):
    duration: int = Field(ge=0, le=MAX_DURATION_S, description="Seconds to run.")


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskSpec:
    """Everything about a task kind that more than one part reads: the one source of it.

    The API validates input with ``input_model``; the worker's task class takes its
    limits from here (``class Greeting(RetriableTask[...], spec=GREETING)``, see
    worker.taskkit.base); the reconciler reads ``timeout_s`` and ``side_effecting``.
    Which errors end a task at once is not per kind: ``PermanentError`` (or a timeout)
    fails it, any other error is retried (worker.taskkit.runner).
    """

    name: str
    input_model: type[TaskInput]
    summary: str
    # Runs at most once: never retried, never started a second time, and recovery never
    # re-runs an attempt that may have started.
    side_effecting: bool = False
    # Lets a side-effecting task be retried and restarted anyway (it knows how to dedupe);
    # the reconciler still treats it as side-effecting.
    retry_side_effects: bool = False
    # Time limit of one attempt; None means the worker default (TASK_TIMEOUT_S).
    timeout_s: float | None = None
    # Attempts before the task fails; None means the worker default (WORKER_MAX_TRIES).
    max_tries: int | None = None

    def __post_init__(self) -> None:
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise ValueError(f"{self.name}: timeout_s must be > 0, got {self.timeout_s}")
        if self.max_tries is not None and self.max_tries < 1:
            raise ValueError(f"{self.name}: max_tries must be >= 1, got {self.max_tries}")
        if self.retry_side_effects and not self.side_effecting:
            raise ValueError(f"{self.name}: retry_side_effects needs side_effecting")

    @property
    def at_most_once(self) -> bool:
        """Never started twice and never retried: side-effecting and not opted out."""
        return self.side_effecting and not self.retry_side_effects


GREETING = TaskSpec(name="greeting", input_model=GreetingInput, summary="Say hello to someone.")
DOWNLOAD = TaskSpec(
    name="download", input_model=DownloadInput, summary="Fetch a URL and report its digest."
)
BLOCKING_LONG_RUNNING = TaskSpec(
    name="blocking_long_running_task",
    input_model=DurationInput,
    summary="Block a worker thread for `duration` seconds.",
    timeout_s=LONG_RUNNING_TIMEOUT_S,
)
NON_BLOCKING_LONG_RUNNING = TaskSpec(
    name="non_blocking_long_running_task",
    input_model=DurationInput,
    summary="Sleep on the event loop for `duration` seconds.",
    timeout_s=LONG_RUNNING_TIMEOUT_S,
)

CATALOG: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (GREETING, DOWNLOAD, BLOCKING_LONG_RUNNING, NON_BLOCKING_LONG_RUNNING)
}
