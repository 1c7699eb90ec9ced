"""The send state machine (``dispatcher.queue.states``): every legal move, and every other one refused."""

from __future__ import annotations

import itertools

import pytest

from dispatcher.errors import IllegalTransition
from dispatcher.queue.records import SendRecord
from dispatcher.queue.states import FINAL_STATES, TRANSITIONS, SendState, initial_state

S = SendState
LEGAL = {
    (S.QUEUED, S.SENDING), (S.QUEUED, S.QUEUED), (S.SCHEDULED, S.SENDING),
    (S.SENDING, S.DELIVERED), (S.SENDING, S.DEFERRED), (S.SENDING, S.FAILED), (S.SENDING, S.UNKNOWN),
    (S.SENDING, S.QUEUED), (S.DEFERRED, S.SENDING), (S.DEFERRED, S.QUEUED),
    (S.FAILED, S.QUEUED), (S.UNKNOWN, S.QUEUED),
    (S.QUEUED, S.BROKEN), (S.SCHEDULED, S.BROKEN), (S.SENDING, S.BROKEN), (S.DEFERRED, S.BROKEN),
    (S.UNKNOWN, S.DELIVERED), (S.UNKNOWN, S.FAILED), (S.UNKNOWN, S.DEFERRED),  # a journaled outcome
}  # fmt: skip
PAIRS = list(itertools.product(SendState, SendState))


@pytest.mark.parametrize(("source", "target"), sorted(LEGAL), ids=lambda s: s.value)
def test_legal_moves(source: SendState, target: SendState) -> None:
    assert source.to(target) is target


@pytest.mark.parametrize(("source", "target"), [p for p in PAIRS if p not in LEGAL], ids=lambda s: s.value)
def test_every_other_move_is_refused(source: SendState, target: SendState) -> None:
    with pytest.raises(IllegalTransition, match=f"from {source.value} to {target.value}"):
        source.to(target)


def test_the_table_is_the_list_above_and_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(SendState)
    assert {(s, t) for s, targets in TRANSITIONS.items() for t in targets} == LEGAL


def test_delivered_is_the_end_and_only_an_operator_retry_leaves_failed_or_unknown() -> None:
    assert TRANSITIONS[S.DELIVERED] == frozenset()
    assert TRANSITIONS[S.BROKEN] == frozenset()  # quarantined: only a delete removes it
    assert all(TRANSITIONS[s] <= {S.QUEUED} for s in FINAL_STATES - {S.UNKNOWN})
    assert TRANSITIONS[S.UNKNOWN] == {S.QUEUED, S.DELIVERED, S.FAILED, S.DEFERRED}
    assert initial_state(True) is S.SCHEDULED and initial_state(False) is S.QUEUED


def test_a_record_moves_through_the_table_and_keeps_its_state_on_a_refused_move() -> None:
    rec = SendRecord("s1", {"message_id": "<m@x>"}, initial_state(False))
    rec.move(S.SENDING)
    rec.move(S.DELIVERED)
    with pytest.raises(IllegalTransition):
        rec.move(S.SENDING)
    assert rec.state is S.DELIVERED


def test_a_stored_state_outside_the_enum_is_refused_when_read() -> None:
    with pytest.raises(ValueError, match="'lost'"):
        SendRecord.from_hash("s1", {b"mail": b"{}", b"state": b"lost"})
