"""A message to more than 100 recipients goes in several transactions (RFC 5321 §4.5.3.1.8: a server must
take 100 RCPTs per transaction, and may refuse more), and recipients a server answers ``452 too many
recipients`` go in the next transaction (§4.5.3.1.10) — against a scripted server that caps RCPTs per
transaction, like Postfix's ``smtpd_recipient_limit``. Before (issue 14), everything past the server's cap
got the 452 and waited for a retry with backoff, a transaction at a time."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from client_support import url
from servers import Fault, ScriptedSmtpServer

from dispatcher.errors import SmtpError
from dispatcher.smtp import RecipientStatus, SendResult, SmtpClient
from dispatcher.smtp.stream import Outgoing

Scripted = Callable[..., ScriptedSmtpServer]
MODES = {
    "lock-step": ["8BITMIME", "ENHANCEDSTATUSCODES"],
    "pipelining": ["PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES"],
    "chunking": ["PIPELINING", "CHUNKING", "8BITMIME", "ENHANCEDSTATUSCODES"],
}
DATA = b"Subject: many\r\n\r\nhello\r\n"


def recipients(count: int, tag: str = "r") -> list[str]:
    return [f"{tag}{index}@y.org" for index in range(count)]


def statuses(result: SendResult) -> dict[RecipientStatus, int]:
    found: dict[RecipientStatus, int] = {}
    for outcome in result.outcomes:
        found[outcome.status] = found.get(outcome.status, 0) + 1
    return found


@pytest.mark.parametrize("mode", sorted(MODES))
def test_250_recipients_go_in_transactions_of_100(scripted_server: Scripted, mode: str) -> None:
    server = scripted_server(ehlo_keywords=MODES[mode], max_rcpts=100)
    marks: list[int] = []
    to = recipients(250)
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("from@x.org", to, DATA, before_data=lambda: marks.append(1))
    assert [o.recipient for o in result.outcomes] == to
    assert statuses(result) == {RecipientStatus.ACCEPTED: 250}
    stored = server.wait_for_messages(3)
    assert [len(m.rcpt_tos) for m in stored] == [100, 100, 50]
    assert [r for m in stored for r in m.rcpt_tos] == to and all(m.data == DATA for m in stored)
    assert len(marks) == 3, "the data-out hook runs before each transaction's data"
    assert not any(line.startswith(b"452") for line in server.lines()), "100 per transaction is the minimum"
    assert server.connection_count == 1


@pytest.mark.parametrize("mode", sorted(MODES))
def test_recipients_answered_452_go_in_the_next_transaction(scripted_server: Scripted, mode: str) -> None:
    server = scripted_server(ehlo_keywords=MODES[mode], max_rcpts=40)
    to = recipients(130)
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("from@x.org", to, DATA)
    assert statuses(result) == {RecipientStatus.ACCEPTED: 130}
    assert [o.recipient for o in result.outcomes] == to
    stored = server.wait_for_messages(4)
    assert sorted(r for m in stored for r in m.rcpt_tos) == sorted(to)
    assert all(len(m.rcpt_tos) <= 40 for m in stored)


def test_a_452_with_nobody_accepted_stays_transient_without_a_loop(scripted_server: Scripted) -> None:
    full = b"452 4.2.2 mailbox full\r\n"
    server = scripted_server(per_recipient={"a@y.org": full, "b@y.org": full})
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("from@x.org", ["a@y.org", "b@y.org", "c@y.org"], DATA)
    assert result.transient == ("a@y.org", "b@y.org") and result.accepted == ("c@y.org",)
    assert len([c for c in server.commands() if c.startswith("MAIL")]) == 2  # one more, then stop


def test_a_break_in_a_later_transaction_keeps_the_earlier_outcomes(scripted_server: Scripted) -> None:
    """The second transaction's data gets no reply: its recipients are unknown, the first 100 stay
    accepted (never resent), the last 50 were not tried and stay transient."""
    server = scripted_server(
        ehlo_keywords=MODES["chunking"], faults={"data_end": Fault("drop", occurrence=2)}
    )
    to = recipients(250)
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("from@x.org", to, DATA)
        assert not client.data_in_flight
    by_recipient = {o.recipient: o.status for o in result.outcomes}
    assert {by_recipient[r] for r in to[:100]} == {RecipientStatus.ACCEPTED}
    assert {by_recipient[r] for r in to[100:200]} == {RecipientStatus.UNKNOWN}
    assert {by_recipient[r] for r in to[200:]} == {RecipientStatus.TRANSIENT}


@pytest.mark.parametrize("mode", ["pipelining", "chunking"])
def test_a_stream_sends_a_large_message_alone_between_the_others(
    scripted_server: Scripted, mode: str
) -> None:
    server = scripted_server(ehlo_keywords=MODES[mode], max_rcpts=100)
    items = [
        Outgoing("small-1", "from@x.org", ("a@y.org",), DATA),
        Outgoing("large", "from@x.org", tuple(recipients(150)), DATA),
        Outgoing("small-2", "from@x.org", ("b@y.org",), DATA),
    ]
    marked: list[str] = []
    source: Iterator[Outgoing] = iter(items)
    outcomes: list[tuple[Outgoing, SendResult | SmtpError]] = []
    with SmtpClient.from_url(url(server.port)) as client:
        while len(outcomes) < len(items):
            outcomes.extend(client.send_stream(source, before_data=lambda m: marked.append(m.key)))
    assert [m.key for m, _ in outcomes] == ["small-1", "large", "small-2"]
    assert all(isinstance(o, SendResult) and not o.transient and not o.permanent for _, o in outcomes)
    large = outcomes[1][1]
    assert isinstance(large, SendResult) and len(large.accepted) == 150
    assert [len(m.rcpt_tos) for m in server.wait_for_messages(4)] == [1, 100, 50, 1]
    assert marked == ["small-1", "large", "large", "small-2"]


@pytest.mark.parametrize("mode", ["pipelining", "chunking"])
def test_a_streamed_message_answered_452_sends_the_rest_once_the_stream_ends(
    scripted_server: Scripted, mode: str
) -> None:
    server = scripted_server(ehlo_keywords=MODES[mode], max_rcpts=40)
    items = [
        Outgoing("small-1", "from@x.org", ("a@y.org",), DATA),
        Outgoing("sixty", "from@x.org", tuple(recipients(60)), DATA),
        Outgoing("small-2", "from@x.org", ("b@y.org",), DATA),
    ]
    marked: list[str] = []
    with SmtpClient.from_url(url(server.port)) as client:
        outcomes = list(client.send_stream(iter(items), before_data=lambda m: marked.append(m.key)))
    assert sorted(m.key for m, _ in outcomes) == ["sixty", "small-1", "small-2"]
    sixty = dict((m.key, o) for m, o in outcomes)["sixty"]
    assert isinstance(sixty, SendResult) and statuses(sixty) == {RecipientStatus.ACCEPTED: 60}
    assert [o.recipient for o in sixty.outcomes] == recipients(60)
    assert sorted(len(m.rcpt_tos) for m in server.wait_for_messages(4)) == [1, 1, 20, 40]
    assert marked.count("sixty") == 2 and server.connection_count == 1
