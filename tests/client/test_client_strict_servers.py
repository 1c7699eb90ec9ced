"""Streams against servers stricter than most: what Exim and Haraka do, scripted (``strictness=``).

Observed against the real servers (issue 11): on Exim with CHUNKING a message refused at every RCPT left
its envelope behind, the next message's pipelined ``MAIL`` got ``503 sender already given``, and Exim
delivered that message under the refused one's sender while the client reported it failed. On Haraka
every command pipelined after the final dot got a 503 and the client failed every second message for
good. Each message must be delivered exactly once, under its own sender, and reported as it happened.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import structlog
from client_support import url
from servers import ScriptedSmtpServer

from dispatcher.errors import SmtpError
from dispatcher.smtp import RecipientStatus, SendResult, SmtpClient
from dispatcher.smtp.quirks import SERVER_QUIRKS
from dispatcher.smtp.stream import Outgoing

Scripted = Callable[..., ScriptedSmtpServer]
CHUNKED = ["PIPELINING", "CHUNKING", "8BITMIME", "SIZE 100000"]
PIPELINED = ["PIPELINING", "8BITMIME", "SIZE 100000"]
REFUSED = {"nobody@y.org": b"550 5.1.1 no such user\r\n"}


@pytest.fixture(autouse=True)
def _fresh_memory() -> Iterator[None]:
    SERVER_QUIRKS.forget()
    yield
    SERVER_QUIRKS.forget()


def message(key: str, *, to: str = "a@y.org") -> Outgoing:
    return Outgoing(
        key, f"{key}@x.org", (to,), b"Subject: %s\r\n\r\nbody of %s\r\n" % (key.encode(), key.encode())
    )


def drain(client: SmtpClient, items: list[Outgoing]) -> dict[str, SendResult | SmtpError]:
    source: Iterator[Outgoing] = iter(items)
    outcomes: dict[str, SendResult | SmtpError] = {}
    while len(outcomes) < len(items):
        before = len(outcomes)
        outcomes.update((m.key, o) for m, o in client.send_stream(source))
        assert len(outcomes) > before, "a stream call made no progress"
    return outcomes


def statuses(outcome: SendResult | SmtpError) -> list[RecipientStatus]:
    assert isinstance(outcome, SendResult), outcome
    return [o.status for o in outcome.outcomes]


def delivered(server: ScriptedSmtpServer) -> list[tuple[str, str]]:
    """(envelope sender, Subject) of every message the server accepted."""
    return [
        (m.mail_from, m.data.split(b"\r\n", 1)[0].decode())
        for m in server.messages
        if m.final_reply is not None and m.final_reply.startswith(b"2")
    ]


@pytest.mark.parametrize("keywords", [CHUNKED, PIPELINED], ids=["chunking", "pipelining"])
def test_exim_a_refused_message_leaves_no_envelope_for_the_next(
    scripted_server: Scripted, keywords: list[str]
) -> None:
    server = scripted_server(ehlo_keywords=keywords, strictness="exim", per_recipient=REFUSED)
    items = [message("first"), message("refused", to="nobody@y.org"), message("after"), message("last")]
    with SmtpClient.from_url(url(server.port)) as client:
        outcomes = drain(client, items)
    assert statuses(outcomes["refused"]) == [RecipientStatus.PERMANENT]
    refused = outcomes["refused"]
    assert isinstance(refused, SendResult) and refused.outcomes[0].reply is not None
    assert refused.outcomes[0].reply.code == 550
    for key in ("first", "after", "last"):
        assert statuses(outcomes[key]) == [RecipientStatus.ACCEPTED], (key, outcomes[key])
    assert sorted(delivered(server)) == sorted(
        [
            ("first@x.org", "Subject: first"),
            ("after@x.org", "Subject: after"),
            ("last@x.org", "Subject: last"),
        ]
    )


def test_haraka_refusing_commands_after_the_dot_gets_every_message_delivered_once(
    scripted_server: Scripted,
) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED, strictness="haraka")
    items = [message(f"m{i}") for i in range(10)]
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(url(server.port)) as client:
        outcomes = drain(client, items)
    for key, outcome in outcomes.items():
        assert statuses(outcome) == [RecipientStatus.ACCEPTED], (key, outcome)
    assert sorted(delivered(server)) == sorted((f"m{i}@x.org", f"Subject: m{i}") for i in range(10))
    assert server.connection_count == 1
    # The follower refused for being pipelined went again on its own; after it nothing crossed a dot.
    assert server.lines().count(b"RSET\r\n") <= 2
    events = [e for e in logs if e["event"] == "smtp_stream_stops_pipelining_after_data"]
    assert len(events) == 1 and events[0]["port"] == server.port


def test_haraka_is_remembered_for_the_next_connection(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED, strictness="haraka")
    with SmtpClient.from_url(url(server.port)) as client:
        drain(client, [message("one"), message("two")])
    with SmtpClient.from_url(url(server.port)) as client:
        outcomes = drain(client, [message(f"n{i}") for i in range(5)])
    assert all(statuses(o) == [RecipientStatus.ACCEPTED] for o in outcomes.values())
    assert len(delivered(server)) == 7
    first, second = server.wait_closed(1), server.wait_closed(2)
    mails = [sum(1 for line in r.lines if line.startswith(b"MAIL")) for r in (first, second)]
    # "two" was refused for following a dot and went again alone; the next connection never tried.
    assert mails == [3, 5]
