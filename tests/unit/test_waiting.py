"""Why a task waits (``throttler.waiting``) and what a relay's claim publishes (``relay.board``).

Every reason on its own, then the order when several hold at once; the board's codec and
the merge of several relays' boards; the board a claim's facts make.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.board import board_from, next_tokens
from throttler.limits import EACH, LimitKey, RuleSet, Scope
from throttler.statuses import TaskStatus
from throttler.throttle import CLUSTER_KEY, Admission, Candidate, InflightCaps
from throttler.waiting import (
    NOTHING_SEEN,
    Reason,
    Waiting,
    WaitingBoard,
    merge,
    on_arrival,
    parse_key,
    task_keys,
    why_waiting,
)

NOW = datetime(2030, 1, 1, tzinfo=UTC)
GREETING = LimitKey(scope=Scope.TASK, value="greeting")
ACME = LimitKey(scope=Scope.ACCOUNT, value="acme")
HOST = LimitKey(scope=Scope.HOST, value="[::1]")
KEYS = [CLUSTER_KEY, GREETING, ACME]


def _board(**verdicts: object) -> WaitingBoard:
    return WaitingBoard(relay_id="r1", written_at=NOW, **verdicts)  # type: ignore[arg-type]


def _why(
    board: WaitingBoard | None,
    *,
    run_at: datetime | None = None,
    status: TaskStatus = TaskStatus.PENDING,
    keys: list[LimitKey] | None = None,
) -> Waiting | None:
    return why_waiting(
        status=status, run_at=run_at, keys=KEYS if keys is None else keys, board=board, now=NOW
    )


def _reason(board: WaitingBoard | None, *, run_at: datetime | None = None) -> Reason:
    waiting = _why(board, run_at=run_at)
    assert waiting is not None
    return waiting.reason


def _s(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


@pytest.mark.parametrize("status", [s for s in TaskStatus if s is not TaskStatus.PENDING])
def test_only_a_pending_task_waits(status: TaskStatus) -> None:
    assert _why(_board(inflight=frozenset(KEYS)), status=status) is None
    assert _why(None, status=status) is None


def test_scheduled_until_its_run_at() -> None:
    assert _why(NOTHING_SEEN, run_at=_s(30)) == Waiting(reason=Reason.SCHEDULED, until=_s(30))
    # A run_at that has come is no reason any more.
    assert _why(NOTHING_SEEN, run_at=_s(0)) == Waiting(reason=Reason.TURN)


def test_no_relay_when_no_board() -> None:
    assert _why(None) == Waiting(reason=Reason.NO_RELAY)


def test_paused_until_the_latest_pause_of_its_keys() -> None:
    board = _board(paused={GREETING: _s(10), ACME: _s(20), HOST: _s(99)})
    assert _why(board) == Waiting(reason=Reason.PAUSED, scope=ACME, until=_s(20))


def test_inflight_names_the_capped_key() -> None:
    board = _board(inflight=frozenset({ACME, HOST}))
    assert _why(board) == Waiting(reason=Reason.INFLIGHT, scope=ACME)


def test_rate_names_the_key_whose_token_comes_last() -> None:
    board = _board(rate={CLUSTER_KEY: _s(1), GREETING: _s(40), HOST: _s(99)})
    assert _why(board) == Waiting(reason=Reason.RATE, scope=GREETING, until=_s(40))


def test_a_block_that_ended_is_no_reason() -> None:
    board = _board(rate={GREETING: _s(0)}, paused={ACME: _s(-1)})
    assert _why(board) == Waiting(reason=Reason.TURN)


def test_queue_full() -> None:
    assert _why(_board(queue_full=True)) == Waiting(reason=Reason.QUEUE_FULL)
    board = _board(queue_full=True, queue_until=_s(3))
    assert _why(board) == Waiting(reason=Reason.QUEUE_FULL, until=_s(3))


def test_turn_when_nothing_holds_it_back() -> None:
    # Keys of other tasks do not concern this one.
    board = _board(rate={HOST: _s(5)}, inflight=frozenset({HOST}), paused={HOST: _s(5)})
    assert _why(board) == Waiting(reason=Reason.TURN)


def test_the_order_scheduled_no_relay_paused_inflight_rate_queue_turn() -> None:
    everything = _board(
        paused={ACME: _s(20)},
        inflight=frozenset({GREETING}),
        rate={CLUSTER_KEY: _s(5)},
        queue_full=True,
    )
    assert _reason(everything, run_at=_s(60)) is Reason.SCHEDULED
    assert _reason(None, run_at=_s(-1)) is Reason.NO_RELAY
    assert _reason(everything) is Reason.PAUSED
    no_pause = _board(inflight=frozenset({GREETING}), rate={CLUSTER_KEY: _s(5)}, queue_full=True)
    assert _reason(no_pause) is Reason.INFLIGHT
    no_cap = _board(rate={CLUSTER_KEY: _s(5)}, queue_full=True)
    assert _reason(no_cap) is Reason.RATE
    assert _reason(_board(queue_full=True)) is Reason.QUEUE_FULL
    assert _reason(_board()) is Reason.TURN


def test_on_arrival_knows_only_run_at() -> None:
    assert on_arrival(run_at=_s(5), now=NOW) == Waiting(reason=Reason.SCHEDULED, until=_s(5))
    assert on_arrival(run_at=None, now=NOW) == Waiting(reason=Reason.TURN)


def test_task_keys_are_every_key_the_relay_could_ask_about() -> None:
    assert task_keys(name="greeting", account="acme", host=None) == KEYS
    assert task_keys(name="download", account="b", host="EXAMPLE.com") == [
        CLUSTER_KEY,
        LimitKey(scope=Scope.TASK, value="download"),
        LimitKey(scope=Scope.ACCOUNT, value="b"),
        LimitKey(scope=Scope.HOST, value="example.com"),
    ]


def test_task_keys_match_the_keys_configured_rules_give() -> None:
    rules = RuleSet.parse("task:greeting rate=1/m; account:* inflight=2; host:* rate=1/s")
    for name, account, host in [("greeting", "acme", None), ("download", "b", "[::1]")]:
        limited = [a.key for a in rules.applicable(name=name, account=account, host=host)]
        assert set(limited) <= set(task_keys(name=name, account=account, host=host))


_keys = st.sampled_from([CLUSTER_KEY, GREETING, ACME, HOST])
_moments = st.integers(min_value=-5, max_value=100).map(_s)
_boards = st.builds(
    WaitingBoard,
    relay_id=st.text(min_size=1, max_size=8),
    written_at=_moments,
    rate=st.dictionaries(_keys, _moments),
    inflight=st.frozensets(_keys),
    paused=st.dictionaries(_keys, _moments),
    queue_full=st.booleans(),
    queue_until=st.none() | _moments,
    expires_at=st.none() | _moments,
)


@given(_boards)
def test_a_board_reads_back_as_written(board: WaitingBoard) -> None:
    assert WaitingBoard.decode(board.encode()) == board


@pytest.mark.parametrize("raw", [b"", b"[]", b"{}", b'{"relay": "r"}', b"\xff"])
def test_a_foreign_board_is_a_value_error(raw: bytes) -> None:
    with pytest.raises(ValueError, match="not a waiting board"):
        WaitingBoard.decode(raw)


def test_keys_with_colons_in_their_values_parse_back() -> None:
    for key in (CLUSTER_KEY, GREETING, HOST, LimitKey(scope=Scope.HOST, value="a.example")):
        assert parse_key(str(key)) == key


def test_merge_unions_blocks_and_takes_the_newest_counts() -> None:
    old = WaitingBoard(
        relay_id="old",
        written_at=_s(-1),
        rate={GREETING: _s(30), CLUSTER_KEY: _s(1)},
        inflight=frozenset({ACME}),
        queue_full=True,
    )
    new = WaitingBoard(relay_id="new", written_at=_s(0), rate={GREETING: _s(40)})
    merged = merge([old, new])
    assert merged == WaitingBoard(
        relay_id="new",
        written_at=_s(0),
        rate={GREETING: _s(40), CLUSTER_KEY: _s(1)},
        inflight=frozenset(),
        queue_full=False,
    )
    assert merge([]) is None


def test_next_tokens_are_on_the_limiters_clock() -> None:
    granted_s = _s(0).timestamp()
    admission = Admission(
        admitted=(), ready_in_s=(), blocked={GREETING: 59.5}, granted_at_s=granted_s
    )
    assert next_tokens(admission) == {GREETING: _s(59.5)}


def test_board_from_a_claim_counts_its_own_leases_and_the_queue_room() -> None:
    caps = InflightCaps(RuleSet.parse("account:* inflight=2; task:greeting inflight=5"))
    leased = [Candidate(task_id="t1", name="greeting", account="acme")]
    board = board_from(
        relay_id="r1",
        written_at=NOW,
        blocked=[GREETING, CLUSTER_KEY],
        next_token={GREETING: _s(40), HOST: _s(9)},
        caps=caps,
        inflight={ACME: 1, GREETING: 1, LimitKey(scope=Scope.ACCOUNT, value="b"): 2},
        occupying=leased,
        room=1,
    )
    # acme is full once t1 counts; b already was; greeting has room. The one room left
    # went to t1. Only blocked keys with a known token time are shown.
    assert board == WaitingBoard(
        relay_id="r1",
        written_at=NOW,
        rate={GREETING: _s(40)},
        inflight=frozenset({ACME, LimitKey(scope=Scope.ACCOUNT, value="b")}),
        queue_full=True,
    )
    no_cap = board_from(
        relay_id="r1",
        written_at=NOW,
        blocked=[],
        next_token={},
        caps=InflightCaps(RuleSet(())),
        inflight={},
        occupying=leased,
        room=None,
    )
    assert no_cap == WaitingBoard(relay_id="r1", written_at=NOW)


def test_a_paused_each_scope_pauses_each_of_its_values() -> None:
    # host:* pauses every host; key:connector:* every connector label, and no other label.
    every_host = LimitKey(scope=Scope.HOST, value=EACH)
    assert _why(_board(paused={every_host: _s(7)}), keys=[*KEYS, HOST]) == Waiting(
        reason=Reason.PAUSED, scope=every_host, until=_s(7)
    )
    connectors = LimitKey(scope=Scope.KEY, value=f"connector:{EACH}")
    labelled = [*KEYS, LimitKey(scope=Scope.KEY, value="connector:sf")]
    assert _why(_board(paused={connectors: _s(9)}), keys=labelled) == Waiting(
        reason=Reason.PAUSED, scope=connectors, until=_s(9)
    )
    other = [*KEYS, LimitKey(scope=Scope.KEY, value="connectors:sf")]
    assert _why(_board(paused={connectors: _s(9)}), keys=other) == Waiting(reason=Reason.TURN)
