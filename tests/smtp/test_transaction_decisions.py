"""The transaction's decision table (``dispatcher.smtp.protocol`` docstring), row by row, without I/O.

Each row feeds the replies a server gave to one pipelined transaction and checks every recipient's
outcome, whether the data went, and whether silence after it would be *unknown*.
"""

from __future__ import annotations

import pytest

from dispatcher.smtp.extensions import Extensions
from dispatcher.smtp.outcomes import RecipientStatus, status_of
from dispatcher.smtp.protocol import StaleEnvelope, Transaction
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

A = RecipientStatus.ACCEPTED
T = RecipientStatus.TRANSIENT
P = RecipientStatus.PERMANENT
U = RecipientStatus.UNKNOWN

OK = Reply(250, ("2.0.0 Ok",))
GO = Reply(354, ("go ahead",))
BUSY = Reply(451, ("4.3.0 try later",))
NO = Reply(550, ("5.1.1 no such user",))
SEQ = Reply(503, ("5.5.1 sender already given",))


def extensions(*keywords: str) -> Extensions:
    return Extensions("test", tuple((k, "") for k in keywords))


def chunked(recipients: int = 1) -> Transaction:
    rcpts = tuple(f"r{i}@y.org" for i in range(recipients))
    return Transaction("s@x.org", rcpts, b"hi\r\n", extensions("PIPELINING", "CHUNKING"))


def piped(recipients: int = 1) -> Transaction:
    rcpts = tuple(f"r{i}@y.org" for i in range(recipients))
    return Transaction("s@x.org", rcpts, b"hi\r\n", extensions("PIPELINING"))


def run_chunked(tx: Transaction, mail: Reply, rcpts: list[Reply], bdat: Reply | None) -> None:
    step = tx.next_step()
    assert step is not None and step.is_data
    assert step.expect == (Stage.MAIL, *([Stage.RCPT] * len(rcpts)), Stage.BDAT)
    tx.data_written()
    tx.receive(Stage.MAIL, mail)
    for reply in rcpts:
        tx.receive(Stage.RCPT, reply)
    if bdat is not None:
        tx.receive(Stage.BDAT, bdat)


def statuses(tx: Transaction) -> list[RecipientStatus]:
    return [o.status for o in tx.outcomes()]


@pytest.mark.parametrize(
    ("reply", "status"), [(OK, A), (BUSY, T), (NO, P), (SEQ, T), (Reply(554, ("no",)), P)]
)
def test_status_of_a_reply_and_503_is_never_a_verdict(reply: Reply, status: RecipientStatus) -> None:
    assert status_of(reply) is status


def test_row_all_accepted() -> None:
    tx = chunked(2)
    run_chunked(tx, OK, [OK, OK], OK)
    assert statuses(tx) == [A, A] and not tx.needs_rset


@pytest.mark.parametrize(("final", "status"), [(BUSY, T), (NO, P), (SEQ, T)])
def test_row_final_reply_decides_for_accepted_recipients(final: Reply, status: RecipientStatus) -> None:
    tx = chunked(1)
    run_chunked(tx, OK, [OK], final)
    assert statuses(tx) == [status] and tx.outcomes()[0].stage is Stage.BDAT


def test_row_silence_after_data_written_awaits_a_verdict_before_it_is_too_late() -> None:
    tx = chunked(1)
    run_chunked(tx, OK, [OK], None)
    assert tx.awaiting_final_reply  # the driver turns a break now into UnknownOutcome


def test_row_silence_before_data_written_is_transient() -> None:
    tx = chunked(1)
    tx.next_step()  # written only in part: data_written() never called
    tx.receive(Stage.MAIL, OK)
    tx.receive(Stage.RCPT, OK)
    assert not tx.awaiting_final_reply and statuses(tx) == [T]


@pytest.mark.parametrize(("rcpt", "status"), [(NO, P), (BUSY, T), (SEQ, T)])
def test_row_rcpt_refusal_is_that_recipients_outcome(rcpt: Reply, status: RecipientStatus) -> None:
    tx = chunked(2)
    run_chunked(tx, OK, [OK, rcpt], OK)
    assert statuses(tx) == [A, status]
    assert tx.outcomes()[1].stage is Stage.RCPT


def test_row_missing_rcpt_reply_is_transient_and_silence_may_mean_delivered() -> None:
    tx = chunked(2)
    tx.next_step()
    tx.data_written()
    tx.receive(Stage.MAIL, OK)
    tx.receive(Stage.RCPT, OK)
    assert statuses(tx) == [T, T] and tx.awaiting_final_reply


def test_row_refused_mail_then_accepted_rcpt_and_data_is_unknown_never_permanent() -> None:
    """Exim after a refused BDAT: MAIL 503 sender already given, RCPT 250, BDAT 250 — delivered, under
    the old sender. Reporting it failed would invite a second delivery."""
    tx = chunked(2)
    run_chunked(tx, SEQ, [OK, NO], OK)
    outcomes = tx.outcomes()
    assert [o.status for o in outcomes] == [U, T]
    assert outcomes[0].reply == OK and outcomes[0].stage is Stage.BDAT
    assert outcomes[1].stage is Stage.MAIL  # refused at RCPT too: nothing reached it
    assert not tx.refused_out_of_sequence  # something was executed: never resent


def test_row_refused_mail_accepted_rcpt_and_silence_after_data_may_mean_delivered() -> None:
    tx = chunked(1)
    run_chunked(tx, SEQ, [OK], None)
    assert tx.awaiting_final_reply


def test_row_refused_mail_and_354_drops_the_connection_before_any_data() -> None:
    tx = piped(1)
    step = tx.next_step()
    assert step is not None and step.expect == (Stage.MAIL, Stage.RCPT, Stage.DATA)
    tx.receive(Stage.MAIL, NO)
    tx.receive(Stage.RCPT, OK)
    with pytest.raises(StaleEnvelope):
        tx.receive(Stage.DATA, GO)
    assert tx.finished and not tx.data_sent and tx.next_step() is None
    assert [(o.status, o.stage) for o in tx.outcomes()] == [(P, Stage.MAIL)]


def test_row_refused_mail_covers_every_recipient_otherwise() -> None:
    tx = chunked(2)
    run_chunked(tx, NO, [OK, NO], Reply(554, ("5.5.1 no valid recipients",)))
    assert [(o.status, o.stage) for o in tx.outcomes()] == [(P, Stage.MAIL), (P, Stage.MAIL)]
    assert tx.deciding_reply() == NO


def test_row_503_to_mail_with_nothing_accepted_was_not_executed() -> None:
    """Haraka after the final dot: every pipelined command 503 — the follower may simply go again."""
    tx = piped(1)
    tx.next_step()
    tx.receive(Stage.MAIL, SEQ)
    tx.receive(Stage.RCPT, SEQ)
    tx.receive(Stage.DATA, SEQ)
    assert tx.finished and not tx.data_sent
    assert tx.refused_out_of_sequence and statuses(tx) == [T]


def test_a_354_after_all_rcpts_refused_ends_an_empty_message_rfc2920() -> None:
    tx = piped(1)
    tx.next_step()
    tx.receive(Stage.MAIL, OK)
    tx.receive(Stage.RCPT, NO)
    tx.receive(Stage.DATA, GO)
    step = tx.next_step()
    assert step is not None and step.payload == b".\r\n"
    tx.data_written()
    assert not tx.awaiting_final_reply  # nobody can receive an empty message to no recipient
    tx.receive(Stage.DATA_END, Reply(554, ("5.5.1 no valid recipients",)))
    assert statuses(tx) == [P]
