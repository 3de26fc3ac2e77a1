"""Exceptions a task raises to say how its failure should be handled."""

from __future__ import annotations


class PermanentError(Exception):
    """Fail the task now: another attempt cannot succeed (bad input, 4xx, refused target)."""


class RetriableError(Exception):
    """Fail this attempt and try again later with backoff (network errors, 5xx).

    Any other exception a task raises is treated the same way; this class only makes the
    intent explicit.
    """


class Backpressure(Exception):
    """The upstream asked us to back off: pause ``scope`` for ``retry_after_s`` seconds.

    The worker pauses the scope (only ever extending a pause already there), records it
    in ``limit_changes`` (reason ``upstream``, by the task id), and puts the task back in
    the outbox to run once the pause ends, without spending one of its tries: the request
    was refused, not done. ``scope`` is one the limits name: ``host:<host>``,
    ``task:<name>``, ``account:<id>``, ``key:<label>:<value>`` or ``cluster``.

        raise Backpressure("host:api.example.com", retry_after_s=30)
    """

    def __init__(self, scope: str, *, retry_after_s: float, detail: str = "") -> None:
        self.scope = scope
        self.retry_after_s = retry_after_s
        self.detail = detail
        super().__init__(f"{detail or 'upstream push-back'}: pause {scope} {retry_after_s:g}s")


class ScopePaused(Backpressure):
    """The scope is paused already (through the API or a push-back): run the task after the
    pause, without spending a try, and record nothing (no upstream asked anything).

    A task released just before its scope was paused raises it rather than reach the
    paused upstream (the download does, for its host).
    """
