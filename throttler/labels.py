"""Task labels: ``prefix:value`` strings chosen at submission (the API's ``key``).

A task carries up to ``MAX_LABELS`` of them; ``GET /tasks?key=`` and the retry filter
select by one, and ``key:<prefix>:<value>`` limit rules will match them. The grammar:

- prefix: a lowercase ASCII letter, then up to 31 lowercase letters, digits, ``_`` or
  ``-``. Lowercase only, refused otherwise rather than folded: a label must be spelt one
  way, or a limit rule written for ``connector:x`` would miss ``Connector:x``.
- value: 1 to 128 of ``A-Z a-z 0-9 . _ - @ :``, case kept (``tenant:ACME`` and
  ``tenant:acme`` are two labels, as two accounts would be). Every character is one a
  ``RELAY_LIMITS`` rule and a URL path (``/limits/key:connector:x``) take as it is:
  none of ``;``, ``=``, ``*``, ``/``, ``%``, ``?``, whitespace; not ``+`` either, which a
  query string reads as a space. The first colon ends the prefix, so a value may hold
  more (``slot:10:30``).

A task's labels are a set: they are kept sorted, so the order they were given in never
makes two requests differ. A label given twice is refused, not collapsed: with four at
most, a repeat is a client's mistake (most likely for another label), and refusing it
keeps the labels stored exactly the labels sent.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

MAX_LABELS = 4
PREFIX_MAX_LENGTH = 32
VALUE_MAX_LENGTH = 128
# The longest label: prefix, colon, value (the storage column's length).
LABEL_MAX_LENGTH = PREFIX_MAX_LENGTH + 1 + VALUE_MAX_LENGTH
LABEL_PATTERN = (
    rf"^[a-z][a-z0-9_-]{{0,{PREFIX_MAX_LENGTH - 1}}}:[A-Za-z0-9._@:-]{{1,{VALUE_MAX_LENGTH}}}$"
)
_LABEL = re.compile(LABEL_PATTERN)
GRAMMAR = (
    f"prefix:value, the prefix a lowercase letter then up to {PREFIX_MAX_LENGTH - 1} of "
    f"a-z 0-9 _ -, the value 1-{VALUE_MAX_LENGTH} of A-Z a-z 0-9 . _ - @ :"
)


class LabelError(ValueError):
    """A set of labels refused; ``index`` is the offending label's place, if one is."""

    def __init__(self, message: str, *, index: int | None = None, value: object = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        self.value = value


def is_label(value: str) -> bool:
    # fullmatch: "$" alone would also accept a trailing newline.
    return _LABEL.fullmatch(value) is not None


def check_label(value: object) -> str:
    """``value`` if it is a label; else raise ``LabelError``."""
    if not isinstance(value, str):
        raise LabelError("a label is a string", value=value)
    if not is_label(value):
        raise LabelError(f"not a label: give {GRAMMAR}", value=value)
    return value


def labels_of(values: Sequence[object]) -> tuple[str, ...]:
    """The labels ``values`` give, sorted; ``LabelError`` for a bad, repeated or fifth one."""
    if len(values) > MAX_LABELS:
        raise LabelError(f"at most {MAX_LABELS} labels", value=list(values))
    seen: set[str] = set()
    for index, value in enumerate(values):
        try:
            label = check_label(value)
        except LabelError as error:
            raise LabelError(error.message, index=index, value=value) from None
        if label in seen:
            raise LabelError("label given twice; give each once", index=index, value=value)
        seen.add(label)
    return tuple(sorted(seen))
