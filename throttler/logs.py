"""Structured logs: one line per event, ``key=value`` pairs after the event name."""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

_FIELDS_ATTR = "fields"
# A value needs quotes when it holds whitespace, a quote or an equals sign (one regex
# search in C: this runs for every field of every line, one line per submitted task).
_NEEDS_QUOTES = re.compile(r'[\s"=]')


def fields(**values: Any) -> dict[str, Any]:
    """Build the ``extra`` for a log call: ``log.info("task.queued", extra=fields(id=...))``."""
    return {_FIELDS_ATTR: values}


def _render(value: Any) -> str:
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        # One line per event, also for a traceback or a multi-line error message.
        return '"' + escaped.replace("\n", "\\n").replace("\r", "\\r") + '"'
    return text


class KeyValueFormatter(logging.Formatter):
    """``2026-11-28T07:00:00.123Z INFO relay relay.dispatched count=5 rate=20.0``."""

    def __init__(self, component: str) -> None:
        super().__init__()
        self.component = component
        # The last second rendered and its text: a busy process logs many lines a second.
        self._stamp_second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._stamp_second:
            self._stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S")
            self._stamp_second = second
        stamp = self._stamp
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname} {self.component} "
        line += record.getMessage()
        extra: dict[str, Any] = getattr(record, _FIELDS_ATTR, {})
        if extra:
            line += " " + " ".join(f"{key}={_render(value)}" for key, value in extra.items())
        if record.exc_info:
            line += " " + _render(self.formatException(record.exc_info))
        return line


def configure_logging(*, component: str, level: str) -> None:
    """Send every log record to stderr as one key=value line, timestamps in UTC."""
    # Our lines show none of the caller's file and line, thread or process: not computing
    # them for every record halves the cost of a line (one line per job on a worker). The
    # switches are the ones the logging HOWTO's "Optimization" section names.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    formatter = KeyValueFormatter(component)
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Per-request and per-job chatter from libraries would drown our one-line events.
    for noisy in ("uvicorn.access", "arq.worker", "arq.jobs", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
