"""parse_strict_json with an array cap: the same documents and refusals, the cap counted early."""

from __future__ import annotations

import json

import pytest

from api.strict_json import ArrayCap, TooManyItemsError, parse_strict_json

CAP = ArrayCap(key="tasks", max_items=3)


@pytest.mark.parametrize(
    "text",
    [
        '{"tasks": [1, {"a": [2]}, "x"]}',
        ' \n{ "tasks" : [ ] , "other" : {"tasks": [1, 2, 3, 4]} } \t',
        '{"tasks": {"a": 1}}',
        "{}",
        "[1, 2, 3, 4, 5]",
        '"tasks"',
        '{"a": 1, "tasks": [null, true, 1.5]}',
    ],
)
def test_a_document_within_the_cap_parses_as_json_does(text: str) -> None:
    assert parse_strict_json(text.encode(), cap=CAP) == json.loads(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"tasks": [1,]}',
        '{"tasks": [1 2]}',
        '{"tasks": [1]',
        '{"tasks": [',
        '{"a": 1,}',
        '{"a" 1}',
        "{a: 1}",
        '{"a": 1} x',
        '{"tasks": [NaN]}',
        '{"tasks": [1], "tasks": [2]}',
        '{"tasks": ["\x01"]}',
    ],
)
def test_invalid_json_is_refused_as_without_the_cap(text: str) -> None:
    with pytest.raises(json.JSONDecodeError):
        parse_strict_json(text.encode(), cap=CAP)
    with pytest.raises(json.JSONDecodeError):
        parse_strict_json(text.encode())


def test_the_first_item_past_the_cap_stops_the_parse() -> None:
    # The item past the cap is not valid JSON: refused as too many, so it was never parsed.
    with pytest.raises(TooManyItemsError):
        parse_strict_json(b'{"tasks": [1, 2, 3, not json at all', cap=CAP)
