"""The label grammar (throttler.labels): what a task may carry as ``key``."""

from __future__ import annotations

import pytest

from throttler.labels import LABEL_MAX_LENGTH, MAX_LABELS, LabelError, is_label, labels_of
from throttler.submit import request_digest

VALID = [
    "connector:salesforce",
    "a:b",
    "tenant:ACME",
    "region:eu-west-1",
    "user:ada@example.com",
    "slot:10:30",
    "x_1-y:v.1_2-3",
    "p" * 32 + ":" + "v" * 128,
]
INVALID = [
    "connector",  # no colon
    "connector:",  # no value
    ":salesforce",  # no prefix
    "Connector:salesforce",  # prefixes are lowercase
    "1tenant:a",  # a prefix starts with a letter
    "_t:a",
    "p" * 33 + ":v",  # prefix too long
    "p:" + "v" * 129,  # value too long
    "a:b c",  # whitespace
    "a:b\n",
    "a:b+c",  # a query string's space
    "a:*",  # a limit rule's wildcard
    "a:b;c",  # a limit rule's separator
    "a:b=c",
    "a:b/c",  # a URL path's separator
    "a:b%20",
    "a:é",  # ASCII only
    "a:\u200b",
    "",
]


@pytest.mark.parametrize("label", VALID)
def test_valid_labels(label: str) -> None:
    assert is_label(label)
    assert len(label) <= LABEL_MAX_LENGTH
    assert labels_of([label]) == (label,)


@pytest.mark.parametrize("label", INVALID)
def test_invalid_labels(label: str) -> None:
    assert not is_label(label)
    with pytest.raises(LabelError) as raised:
        labels_of(["ok:1", label])
    assert raised.value.index == 1


def test_labels_are_a_sorted_set_of_at_most_four() -> None:
    assert labels_of(["b:2", "a:1", "c:3"]) == ("a:1", "b:2", "c:3")
    assert labels_of([]) == ()
    assert len(labels_of([f"k:{i}" for i in range(MAX_LABELS)])) == MAX_LABELS
    with pytest.raises(LabelError, match="at most 4"):
        labels_of([f"k:{i}" for i in range(MAX_LABELS + 1)])
    with pytest.raises(LabelError, match="twice") as raised:
        labels_of(["a:1", "b:2", "a:1"])
    assert raised.value.index == 2
    with pytest.raises(LabelError, match="string"):
        labels_of([5])


def test_a_request_without_labels_hashes_as_before_labels_existed() -> None:
    """Keys bound before the upgrade still replay: this digest was stored by 0007's code."""
    digest = request_digest(
        name="greeting", payload={"name": "Ada"}, priority=5, delay_s=None, run_at=None
    )
    assert digest == "85d9762794e341cb06391d71cc14ffcb7e19f33aba7c4c609b3c2e4a46a75864"


def test_labels_make_another_request_whatever_their_order() -> None:
    def digest(*labels: str) -> str:
        return request_digest(
            name="greeting",
            payload={"name": "Ada"},
            priority=5,
            delay_s=None,
            run_at=None,
            labels=labels,
        )

    assert digest("a:1", "b:2") == digest("b:2", "a:1")
    assert digest("a:1") != digest() != digest("a:2")
