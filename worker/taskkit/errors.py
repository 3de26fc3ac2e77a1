"""Exceptions a task raises to say how its failure should be handled."""

from __future__ import annotations


class PermanentError(Exception):
    """Fail the task now: another attempt cannot succeed (bad input, 4xx, refused target)."""


class RetriableError(Exception):
    """Fail this attempt and try again later with backoff (network errors, 5xx).

    Any other exception a task raises is treated the same way; this class only makes the
    intent explicit.
    """
