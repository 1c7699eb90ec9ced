"""One message to more recipients than one transaction may carry: several transactions, one result.

RFC 5321 §4.5.3.1.8: a server MUST accept at least 100 RCPT commands per transaction and MAY refuse more,
so ``SmtpClient.send`` gives a message's recipients to transactions of at most ``MAX_RCPT_PER_TRANSACTION``,
one after the other on the same connection (the same bytes each time, ``before_data`` before each one's
data); each recipient's outcome is the one its own transaction gave it. RFC 5321 §4.5.3.1.10: a server
whose recipient buffer is full answers RCPT with ``452`` and the client tries those recipients in a later
transaction — here the next one, as long as the transaction that answered 452 accepted somebody (so every
extra transaction makes progress); otherwise they stay transient and the queue retries them later.

``EnvelopePlan`` holds which recipients are still to go and what each got; it does no I/O.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from dispatcher.errors import SmtpError, UnknownOutcome
from dispatcher.smtp.outcomes import RecipientOutcome, RecipientStatus, SendResult
from dispatcher.smtp.stages import Stage

MAX_RCPT_PER_TRANSACTION = 100
TOO_MANY_RECIPIENTS = 452
_SETTLED_STAGES = (Stage.MAIL, Stage.RCPT)


class EnvelopePlan:
    """The transactions of one message: ``next_batch()`` to send, ``settle()`` / ``broke()`` what came back,
    ``result()`` the merged outcome in the order the recipients were given."""

    def __init__(self, recipients: Sequence[str], per_transaction: int = MAX_RCPT_PER_TRANSACTION) -> None:
        self.recipients = tuple(recipients)
        self.per_transaction = per_transaction
        self.todo: deque[str] = deque(self.recipients)
        self.outcomes: dict[str, RecipientOutcome] = {}
        self.results: list[SendResult] = []
        self.retried_after_452 = 0
        self.broken = False

    @property
    def started(self) -> bool:
        """A transaction of this message ended with its replies: its outcomes must not be lost."""
        return bool(self.results)

    def next_batch(self) -> tuple[str, ...] | None:
        if not self.todo:
            return None
        count = min(self.per_transaction, len(self.todo))
        return tuple(self.todo.popleft() for _ in range(count))

    def settle(self, result: SendResult) -> None:
        """Take one transaction's result; recipients it answered 452 go first into the next one when it
        accepted somebody."""
        self.results.append(result)
        progress = wants_next_transaction(result)
        retry = [o.recipient for o in result.outcomes if progress and _buffer_full(o)]
        again = set(retry)
        self.outcomes.update((o.recipient, o) for o in result.outcomes if o.recipient not in again)
        self.todo.extendleft(reversed(retry))
        self.retried_after_452 += len(retry)

    def broke(self, exc: SmtpError, batch: Sequence[str]) -> None:
        """A later transaction failed (``exc``) after earlier ones ended: its recipients get the error's
        verdict — but what its MAIL or RCPT replies settled — and the ones not tried yet stay transient."""
        self.broken = True
        settled = {
            o.recipient: o
            for o in exc.outcomes
            if o.stage in _SETTLED_STAGES and o.reply is not None and not o.reply.is_positive
        }
        status, stage = _status_of_error(exc), exc.stage or Stage.MAIL
        for recipient in batch:
            self.outcomes[recipient] = settled.get(recipient) or RecipientOutcome(
                recipient, status, stage, exc.reply
            )
        while self.todo:
            recipient = self.todo.popleft()
            self.outcomes[recipient] = RecipientOutcome(recipient, RecipientStatus.TRANSIENT, Stage.MAIL)

    def result(self) -> SendResult:
        """One result for the whole message: the only transaction's as it is, else the merge."""
        if len(self.results) == 1 and not (self.broken or self.retried_after_452):
            return self.results[0]
        last = self.results[-1]
        refused = [r.reply for r in self.results if r.reply is not None and not r.reply.is_positive]
        return SendResult(
            tuple(self.outcomes[r] for r in self.recipients),
            refused[-1] if refused else last.reply,
            last.conn_id,
            last.transcript,
            sum(r.round_trips for r in self.results),
        )


def wants_next_transaction(result: SendResult) -> bool:
    """The transaction accepted somebody and answered 452 to somebody: those go in the next one."""
    outcomes = result.outcomes
    return any(o.status is RecipientStatus.ACCEPTED for o in outcomes) and any(map(_buffer_full, outcomes))


def _buffer_full(outcome: RecipientOutcome) -> bool:
    return (
        outcome.stage is Stage.RCPT
        and outcome.reply is not None
        and outcome.reply.code == TOO_MANY_RECIPIENTS
    )


def _status_of_error(exc: SmtpError) -> RecipientStatus:
    if isinstance(exc, UnknownOutcome):
        return RecipientStatus.UNKNOWN
    return RecipientStatus.TRANSIENT if exc.transient or exc.route_level else RecipientStatus.PERMANENT
