"""The key=value log lines: one line per event, values quoted only when they must be."""

from __future__ import annotations

import logging
import sys

from throttler.logs import KeyValueFormatter, fields


def _line(message: str, **values: object) -> str:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, message, None, None)
    record.__dict__.update(fields(**values))
    return KeyValueFormatter("api").format(record)


def test_plain_values_stay_bare_and_others_are_quoted_and_escaped() -> None:
    line = _line(
        "task.submitted", task_id="0193-ab_1.2", name="a b", expr="x=1", quote='say "hi"', empty=""
    )
    assert line.endswith(
        ' INFO api task.submitted task_id=0193-ab_1.2 name="a b" expr="x=1" '
        'quote="say \\"hi\\"" empty=""'
    )


def _fail() -> None:
    raise ValueError("boom\nmore")


def test_a_multi_line_value_or_traceback_stays_on_one_line() -> None:
    assert "\n" not in _line("task.failed", error="first\nsecond\r\nthird")
    try:
        _fail()
    except ValueError:
        record = logging.LogRecord(
            "t", logging.ERROR, __file__, 1, "relay.error", None, sys.exc_info()
        )
    line = KeyValueFormatter("relay").format(record)
    assert "\n" not in line
    assert "ValueError: boom\\nmore" in line
