"""The life of one send: its states and the one table of moves between them.

    (new) ──► queued ─────┐        ┌──► delivered
    (new) ──► scheduled ──┼──► sending ──► deferred ──► sending …
                deferred ─┘        ├──► failed   ──► queued (operator retry, fresh budget)
                                   ├──► unknown  ──► queued (operator retry)
                                   │             └──► delivered · failed · deferred (journal replay)
                                   └──► queued   (crash recovery, or handed back by a stopping batch)
    queued · scheduled · sending · deferred ──► broken   (its record cannot be read: quarantined)

``sending`` means a worker holds the send under a lease in ``dispatch:inflight``; every other state has no
owner but its rq job. ``delivered``, ``failed`` and ``unknown`` are final: no job acts on them, only an
operator's retry (failed, unknown) moves them on — or, for ``unknown``, the replay of an outcome its
worker journaled while Redis was away. ``broken`` is a quarantine: a record that cannot be read
(its hash does not parse, its stored mail is not UTF-8 JSON) can never be sent, so it is kept with the
parse error as its reason, shown by the dashboard and ``status``, skipped by the reaper, and left only by
deletion. Every change of a send's state in the code goes through
``SendState.to`` (or ``SendRecord.move``); a move the table does not hold raises ``IllegalTransition``.
"""

from __future__ import annotations

import enum

from dispatcher.errors import IllegalTransition


class SendState(enum.StrEnum):
    QUEUED = "queued"
    SCHEDULED = "scheduled"
    SENDING = "sending"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"
    UNKNOWN = "unknown"
    BROKEN = "broken"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES

    def to(self, target: SendState) -> SendState:
        """``target`` if the table allows moving there from this state, else ``IllegalTransition``."""
        if target not in TRANSITIONS[self]:
            raise IllegalTransition(f"a send cannot move from {self.value} to {target.value}")
        return target


INITIAL_STATES = frozenset({SendState.QUEUED, SendState.SCHEDULED})
FINAL_STATES = frozenset({SendState.DELIVERED, SendState.FAILED, SendState.UNKNOWN, SendState.BROKEN})
RETRYABLE_STATES = (SendState.FAILED, SendState.UNKNOWN, SendState.DEFERRED)
"""What an operator's retry accepts (a deferred send is retried now, with a fresh budget)."""
FAILURE_STATES = (SendState.FAILED, SendState.UNKNOWN)

TRANSITIONS: dict[SendState, frozenset[SendState]] = {
    SendState.QUEUED: frozenset({SendState.SENDING, SendState.QUEUED, SendState.BROKEN}),
    SendState.SCHEDULED: frozenset({SendState.SENDING, SendState.BROKEN}),
    SendState.SENDING: frozenset(
        {
            SendState.DELIVERED,
            SendState.DEFERRED,
            SendState.FAILED,
            SendState.UNKNOWN,
            SendState.QUEUED,
            SendState.BROKEN,
        }
    ),
    SendState.DEFERRED: frozenset({SendState.SENDING, SendState.QUEUED, SendState.BROKEN}),
    SendState.DELIVERED: frozenset(),
    SendState.FAILED: frozenset({SendState.QUEUED}),
    SendState.UNKNOWN: frozenset(
        {SendState.QUEUED, SendState.DELIVERED, SendState.FAILED, SendState.DEFERRED}
    ),
    SendState.BROKEN: frozenset(),
}
"""Each state's legal next states. queued → queued: a crash-recovery requeue of a send whose job was
lost before it began (a new job, the same state). unknown → delivered / failed / deferred: the outcome
its worker knew, journaled while Redis was away, reaches Redis after recovery settled the send unknown
(``delivery.journal``)."""


def initial_state(scheduled: bool) -> SendState:
    return SendState.SCHEDULED if scheduled else SendState.QUEUED
