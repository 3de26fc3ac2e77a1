"""Why a pending task is waiting: the vocabulary, the relays' board, and the verdict.

The relays decide what goes; the API only reports what they saw. After its claims each
relay publishes a ``WaitingBoard`` (``relay.board``): the keys whose buckets it found
empty and until when their next token falls due, the keys at their in-flight cap, the
paused keys, and whether ARQ's queue is full. ``why_waiting`` then names one reason for a
task from its own facts and the boards of the live relays, merged (``merge``); it never
re-derives a limit, nor reads the limit rules: a task's keys are every key the relay
could ask the limiter and the caps about (``task_keys``), and the boards say which of
them hold it back.

Times on the board are UTC wall time: a bucket's next token is the limiter's own answer
(Redis ``TIME`` plus its wait), not the relay's early re-ask moment.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from throttler.limits import EACH, Limit, LimitKey, Rule, RuleSet, Scope, each_value
from throttler.statuses import TaskStatus


class Reason(StrEnum):
    """Why a pending task has not been handed to ARQ yet (SPEC, plus ``no_relay``)."""

    SCHEDULED = "scheduled"  # its run_at is ahead; until: run_at
    NO_RELAY = "no_relay"  # no relay is alive: nothing pending is dispatched
    PAUSED = "paused"  # one of its scopes is paused; until: the pause's end
    INFLIGHT = "inflight"  # one of its scopes is at its in-flight cap
    RATE = "rate"  # one of its scopes' buckets is empty; until: its next token
    QUEUE_FULL = "queue_full"  # ARQ's queue holds RELAY_MAX_QUEUE_DEPTH jobs
    TURN = "turn"  # nothing holds it back: other tasks go first


@dataclass(frozen=True, kw_only=True, slots=True)
class Waiting:
    """One pending task's reason; ``scope`` names the limited key, if one is the cause."""

    reason: Reason
    scope: LimitKey | None = None
    until: datetime | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class WaitingBoard:
    """What one relay saw at its latest claim, for the API to report."""

    relay_id: str
    written_at: datetime
    # Keys whose bucket had no token -> when the next one falls due.
    rate: Mapping[LimitKey, datetime] = field(default_factory=dict)
    # Keys at their in-flight cap.
    inflight: frozenset[LimitKey] = frozenset()
    # Paused keys -> when the pause ends (a ``*`` key: every value of its scope).
    paused: Mapping[LimitKey, datetime] = field(default_factory=dict)
    # ARQ's queue had no room (RELAY_MAX_QUEUE_DEPTH); until: when it will, if known.
    queue_full: bool = False
    queue_until: datetime | None = None
    # Past this moment the board is stale (its relay meant to claim again well before).
    expires_at: datetime | None = None

    def same_verdicts(self, other: WaitingBoard | None) -> bool:
        """Whether ``other`` says the same about every key (who and when aside)."""
        return other is not None and (
            self.rate,
            self.inflight,
            self.paused,
            self.queue_full,
            self.queue_until,
        ) == (other.rate, other.inflight, other.paused, other.queue_full, other.queue_until)

    def encode(self) -> bytes:
        return json.dumps(
            {
                "relay": self.relay_id,
                "written_at": self.written_at.timestamp(),
                "rate": _times_out(self.rate),
                "inflight": sorted(str(key) for key in self.inflight),
                "paused": _times_out(self.paused),
                "queue_full": self.queue_full,
                "queue_until": _time_out(self.queue_until),
                "expires_at": _time_out(self.expires_at),
            },
            separators=(",", ":"),
        ).encode()

    @classmethod
    def decode(cls, raw: bytes | str) -> WaitingBoard:
        """Read a board ``encode`` wrote; raise ValueError if it is not one."""
        try:
            data = json.loads(raw)
            return cls(
                relay_id=str(data["relay"]),
                written_at=_time_in(data["written_at"]),
                rate=_times_in(data["rate"]),
                inflight=frozenset(parse_key(text) for text in data["inflight"]),
                paused=_times_in(data["paused"]),
                queue_full=bool(data["queue_full"]),
                queue_until=_maybe_time_in(data["queue_until"]),
                expires_at=_maybe_time_in(data["expires_at"]),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise ValueError(f"not a waiting board: {error!r}") from error


# A board on which nothing holds anything back: a live relay's that has not written one.
NOTHING_SEEN = WaitingBoard(relay_id="", written_at=datetime.min.replace(tzinfo=UTC))


def merge(boards: Sequence[WaitingBoard]) -> WaitingBoard | None:
    """One board from every live relay's (None: there is none).

    Buckets and pauses are shared by every relay, but each relay learns of an empty bucket
    only when it asks: a key blocked on any board is blocked, until the latest moment
    any says. In-flight counts and queue room are read from the database and ARQ's queue
    by every claim alike: the newest board's are the freshest.
    """
    if not boards:
        return None
    newest = max(boards, key=lambda board: board.written_at)
    return WaitingBoard(
        relay_id=newest.relay_id,
        written_at=newest.written_at,
        rate=_latest(board.rate for board in boards),
        inflight=newest.inflight,
        paused=_latest(board.paused for board in boards),
        queue_full=newest.queue_full,
        queue_until=newest.queue_until,
    )


# A rule of every scope for every value: what ``RuleSet.applicable`` returns for it is every
# key a task has, whatever limits are configured (the boards say which are limited). Labels
# are not among them: a key: ``*`` rule covers one prefix, so a task's label keys are its
# labels themselves (``task_keys``).
_EVERY_KEY = RuleSet(
    tuple(
        Rule(
            scope=scope,
            value=None if scope is Scope.CLUSTER else EACH,
            limit=Limit(inflight=1),
            text=f"every {scope.value} key",
        )
        for scope in Scope
        if scope is not Scope.KEY
    )
)


def task_keys(
    *, name: str, account: str, host: str | None, labels: Iterable[str] = ()
) -> list[LimitKey]:
    """Every key of a task, found as the relay finds the keys it asks the limiter about.

    Not filtered by the limits in force: the reader's rules might not be the relays'
    (they change at run time), and a key that is not limited is on no board.
    """
    keys = [applied.key for applied in _EVERY_KEY.applicable(name=name, account=account, host=host)]
    return keys + [LimitKey(scope=Scope.KEY, value=label) for label in labels]


def why_waiting(
    *,
    status: TaskStatus,
    run_at: datetime | None,
    keys: Sequence[LimitKey],
    board: WaitingBoard | None,
    now: datetime,
) -> Waiting | None:
    """Name the first reason a task waits, in the order: scheduled, no relay, paused,
    in flight, rate, queue full, turn; None for a task that is not pending.

    ``board`` None means no relay is alive; a live relay that published nothing yet saw
    nothing holding anything back (an empty board). Blocks that ended by ``now`` no
    longer count.
    """
    if status is not TaskStatus.PENDING:
        return None
    if run_at is not None and run_at > now:
        return Waiting(reason=Reason.SCHEDULED, until=run_at)
    if board is None:
        return Waiting(reason=Reason.NO_RELAY)
    # A paused ``*`` scope pauses each of its values.
    each = [LimitKey(scope=k.scope, value=each_value(k)) for k in keys if k.value is not None]
    paused = _latest_of([*keys, *each], board.paused, now=now)
    if paused is not None:
        return Waiting(reason=Reason.PAUSED, scope=paused[0], until=paused[1])
    capped = next((key for key in keys if key in board.inflight), None)
    if capped is not None:
        return Waiting(reason=Reason.INFLIGHT, scope=capped)
    rated = _latest_of(keys, board.rate, now=now)
    if rated is not None:
        return Waiting(reason=Reason.RATE, scope=rated[0], until=rated[1])
    if board.queue_full:
        return Waiting(reason=Reason.QUEUE_FULL, until=board.queue_until)
    return Waiting(reason=Reason.TURN)


def on_arrival(*, run_at: datetime | None, now: datetime) -> Waiting:
    """A task just submitted, before any relay saw it: waiting for run_at, or its turn."""
    waiting = why_waiting(
        status=TaskStatus.PENDING, run_at=run_at, keys=(), board=NOTHING_SEEN, now=now
    )
    assert waiting is not None  # pending
    return waiting


def parse_key(text: str) -> LimitKey:
    """The key ``str(LimitKey)`` wrote: the scope before the first colon, the value after."""
    scope, sep, value = text.partition(":")
    return LimitKey(scope=Scope(scope), value=value if sep else None)


def _latest_of(
    keys: Iterable[LimitKey], untils: Mapping[LimitKey, datetime], *, now: datetime
) -> tuple[LimitKey, datetime] | None:
    """The key whose block lasts longest, among ``keys`` still blocked at ``now``."""
    found = [(key, untils[key]) for key in keys if key in untils and untils[key] > now]
    return max(found, key=lambda pair: pair[1]) if found else None


def _latest(maps: Iterable[Mapping[LimitKey, datetime]]) -> dict[LimitKey, datetime]:
    merged: dict[LimitKey, datetime] = {}
    for untils in maps:
        for key, until in untils.items():
            if key not in merged or until > merged[key]:
                merged[key] = until
    return merged


def _time_out(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp()


def _time_in(posix_s: Any) -> datetime:
    return datetime.fromtimestamp(float(posix_s), UTC)


def _maybe_time_in(posix_s: Any) -> datetime | None:
    return None if posix_s is None else _time_in(posix_s)


def _times_out(untils: Mapping[LimitKey, datetime]) -> dict[str, float]:
    return {str(key): until.timestamp() for key, until in untils.items()}


def _times_in(data: Mapping[str, Any]) -> dict[LimitKey, datetime]:
    return {parse_key(text): _time_in(posix_s) for text, posix_s in data.items()}
