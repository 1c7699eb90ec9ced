"""Connection reuse: one connection for many messages, stale connections, caps, NOOP probe, RSET, QUIT.

Issue 2, client item 7 (reuse); tests: "100 messages on one client → exactly one TCP connection and one
EHLO at the server; the server drops the idle connection → the next send reconnects by itself".
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from client_support import Relay, url
from helpers import wait_until
from servers import Fault, RecordingSmtpServer, ScriptedSmtpServer

from dispatcher.errors import UnknownOutcome
from dispatcher.smtp import RecipientStatus, SessionState, SmtpClient, Stage
from dispatcher.smtp.protocol import StaleEnvelope

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]

PIPELINED = ["PIPELINING", "8BITMIME", "SIZE 100000"]


def _verbs(sink: RecordingSmtpServer) -> list[str]:
    return [line.split(" ", 1)[0].upper() for line in sink.command_lines()]


def _wait_past(seconds: float) -> None:
    """Let ``seconds`` of monotonic time pass (a condition on the clock, not a race with another thread)."""
    deadline = time.monotonic() + seconds
    wait_until(lambda: time.monotonic() >= deadline, timeout=seconds + 5)


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_hundred_messages_one_connection_one_ehlo(smtp_server: Sink, pipelining: bool) -> None:
    sink = smtp_server(pipelining=pipelining)
    with SmtpClient.from_url(url(sink.port)) as client:
        results = [client.send("a@x.org", [f"r{i}@y.org"], b"message %d\r\n" % i) for i in range(100)]
        assert client.connections_opened == 1
        assert client.messages_on_connection == 100
        assert len({r.conn_id for r in results}) == 1
    assert all(r.accepted == (f"r{i}@y.org",) for i, r in enumerate(results))
    messages = sink.wait_for_messages(100, 10)
    assert [m.data for m in messages] == [b"message %d\r\n" % i for i in range(100)]
    assert sink.connections == 1
    assert sink.ehlo_count == 1
    assert _verbs(sink).count("QUIT") == 1 and _verbs(sink).count("RSET") == 0
    assert _verbs(sink).count("NOOP") == 0


def test_hundred_messages_with_chunking_one_connection(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=[*PIPELINED, "CHUNKING"])
    with SmtpClient.from_url(url(server.port)) as client:
        for i in range(100):
            client.send("a@x.org", ["b@y.org"], b"m%d\r\n" % i)
    server.wait_closed(1)
    assert server.connection_count == 1
    assert server.commands(1).count("EHLO") == 1
    assert server.round_trips == 100
    assert len(server.messages) == 100


def test_server_hangs_up_while_idle_next_send_reconnects(smtp_server: Sink) -> None:
    sink = smtp_server()
    with Relay(sink.port) as relay, SmtpClient.from_url(url(relay.port)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        relay.cut()
        wait_until(lambda: sink.active_connections == 0 and relay.open_connections == 0, timeout=5)
        result = client.send("a@x.org", ["b@y.org"], b"two\r\n")
        assert result.accepted == ("b@y.org",)
        assert client.connections_opened == 2
        events = [e.get("event") for e in result.transcript]
        assert "smtp_connection_stale" in events and "smtp_reconnect" not in events
    assert sink.connections == 2
    assert [m.data for m in sink.wait_for_messages(2, 5)] == [b"one\r\n", b"two\r\n"]
    assert [m.connection_id for m in sink.messages] == [1, 2]


def test_server_hangs_up_an_idle_tls_connection_next_send_reconnects(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path
) -> None:
    sink = smtp_server()
    with (
        Relay(sink.port, server_context=tls_server_context) as relay,
        SmtpClient.from_url(url(relay.port, scheme="smtps", ca_file=tls_ca_file)) as client,
    ):
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        relay.cut()
        wait_until(lambda: relay.open_connections == 0, timeout=5)
        assert client.send("a@x.org", ["b@y.org"], b"two\r\n").accepted == ("b@y.org",)
        assert client.connections_opened == 2 and client.tls_version is not None
    assert [m.data for m in sink.wait_for_messages(2, 5)] == [b"one\r\n", b"two\r\n"]
    assert sink.connections == 2


def test_server_writes_while_idle_connection_is_replaced(scripted_server: Scripted) -> None:
    # The final reply carries an unasked 421 behind it: the connection is not reused.
    server = scripted_server(
        ehlo_keywords=PIPELINED,
        faults={"data_end": Fault("reply", b"250 2.0.0 ok\r\n421 4.4.2 idle timeout\r\n", occurrence=1)},
        faults_on_connection=1,
    )
    with SmtpClient.from_url(url(server.port)) as client:
        assert client.send("a@x.org", ["b@y.org"], b"one\r\n").accepted == ("b@y.org",)
        assert client.send("a@x.org", ["b@y.org"], b"two\r\n").accepted == ("b@y.org",)
        assert client.connections_opened == 2
    assert server.connection_count == 2
    assert [m.connection_id for m in server.messages] == [1, 2]
    assert server.commands(1) == ["EHLO", "MAIL", "RCPT", "DATA"]  # nothing sent into the stale socket


def test_max_messages_quits_and_opens_a_new_connection(smtp_server: Sink) -> None:
    sink = smtp_server()
    with SmtpClient.from_url(url(sink.port, max_messages=3)) as client:
        ids = [client.send("a@x.org", ["b@y.org"], b"m%d\r\n" % i).conn_id for i in range(7)]
        assert client.connections_opened == 3
    assert len(set(ids[:3])) == len(set(ids[3:6])) == 1 and len(set(ids)) == 3
    assert sink.connections == 3 and sink.ehlo_count == 3
    assert [m.connection_id for m in sink.wait_for_messages(7, 5)] == [1, 1, 1, 2, 2, 2, 3]
    for connection in (1, 2, 3):
        assert sink.command_lines(connection)[-1] == "QUIT"  # retired politely, not dropped


def test_max_age_retires_the_connection(smtp_server: Sink) -> None:
    sink = smtp_server()
    with SmtpClient.from_url(url(sink.port, max_age=0.3)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        client.send("a@x.org", ["b@y.org"], b"two\r\n")  # young enough
        _wait_past(0.35)
        client.send("a@x.org", ["b@y.org"], b"three\r\n")
        assert client.connections_opened == 2
    assert [m.connection_id for m in sink.wait_for_messages(3, 5)] == [1, 1, 2]
    assert sink.command_lines(1)[-1] == "QUIT"


def test_idle_probe_sends_noop_before_reuse(smtp_server: Sink) -> None:
    sink = smtp_server()
    with SmtpClient.from_url(url(sink.port, idle_probe=0.2)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        client.send("a@x.org", ["b@y.org"], b"two\r\n")  # not idle long enough: no probe
        _wait_past(0.25)
        client.send("a@x.org", ["b@y.org"], b"three\r\n")
        assert client.connections_opened == 1
    verbs = _verbs(sink)
    assert verbs.count("NOOP") == 1
    mails = [i for i, verb in enumerate(verbs) if verb == "MAIL"]
    assert mails[1] < verbs.index("NOOP") < mails[2]
    assert sink.connections == 1


@pytest.mark.parametrize(
    "fault",
    [Fault("drop"), Fault("reply", b"421 4.4.2 bye\r\n"), Fault("reply", b"500 5.5.1 what\r\n")],
    ids=["drop", "421", "500"],
)
def test_failed_noop_probe_means_a_fresh_connection(scripted_server: Scripted, fault: Fault) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED, faults={"noop": fault}, faults_on_connection=1)
    with SmtpClient.from_url(url(server.port, idle_probe=0.1)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        _wait_past(0.15)
        assert client.send("a@x.org", ["b@y.org"], b"two\r\n").accepted == ("b@y.org",)
        assert client.connections_opened == 2
    assert server.connection_count == 2
    assert server.commands(1)[-1] == "NOOP"
    assert [m.connection_id for m in server.messages] == [1, 2]


def test_close_sends_quit_and_closes(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED)
    client = SmtpClient.from_url(url(server.port))
    client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert client.state is SessionState.READY
    client.close()
    assert client.state is SessionState.CLOSED
    record = server.wait_closed(1)
    assert record.ended == "quit" and server.commands(1)[-1] == "QUIT"
    client.close()  # idempotent: nothing more sent
    assert server.commands(1).count("QUIT") == 1


def test_abort_closes_without_quit(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED)
    client = SmtpClient.from_url(url(server.port))
    client.send("a@x.org", ["b@y.org"], b"x\r\n")
    client.abort()
    assert client.state is SessionState.CLOSED
    assert server.wait_closed(1).ended == "eof"
    assert "QUIT" not in server.commands(1)


def test_noop_and_connect_are_lazy_and_reuse(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED)
    with SmtpClient.from_url(url(server.port)) as client:
        assert client.state is SessionState.NEW and server.connection_count == 0
        client.connect()
        assert client.state is SessionState.READY
        assert client.noop().code == 250
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
        assert client.connections_opened == 1
    assert server.commands(1) == ["EHLO", "NOOP", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
def test_rset_after_refused_mail_then_the_connection_is_reused(
    scripted_server: Scripted, pipelining: bool
) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED if pipelining else ["8BITMIME"],
        faults={"mail": Fault("reply", b"550 5.7.1 sender refused\r\n", occurrence=1)},
        faults_on_connection=1,
    )
    with SmtpClient.from_url(url(server.port)) as client:
        if pipelining:
            # The scripted server keeps the sender although it answered 550 (a fault replaces only the
            # reply), so RCPT and DATA win 250 and 354: the server holds an envelope that is not ours.
            # Nothing may be delivered under it: the connection is dropped before any data.
            with pytest.raises(StaleEnvelope) as caught:
                client.send("bad@x.org", ["b@y.org", "c@y.org"], b"x\r\n")
            outcomes = caught.value.outcomes
        else:
            outcomes = client.send("bad@x.org", ["b@y.org", "c@y.org"], b"x\r\n").outcomes
        assert [(o.status, o.stage) for o in outcomes] == [(RecipientStatus.PERMANENT, Stage.MAIL)] * 2
        assert {(o.reply.code, o.reply.enhanced) for o in outcomes if o.reply} == {(550, "5.7.1")}
        ok = client.send("good@x.org", ["b@y.org"], b"y\r\n")
        assert ok.accepted == ("b@y.org",)
        assert client.connections_opened == (2 if pipelining else 1)
    verbs = server.commands(1)
    if pipelining:
        assert verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA"]
        assert server.wait_closed(1).ended == "eof"
        assert len(server.messages) == 1
    else:
        assert verbs[:4] == ["EHLO", "MAIL", "RSET", "MAIL"]  # lock-step: no RCPT after a refused MAIL
    assert server.messages[-1].mail_from == "good@x.org"


def test_rset_failure_is_ignored_and_the_original_outcome_kept(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED,
        per_recipient={"gone@y.org": b"550 5.1.1 gone\r\n"},
        faults={"rset": Fault("reply", b"500 5.5.1 RSET? never heard of it\r\n")},
        faults_on_connection=1,
    )
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", ["gone@y.org"], b"x\r\n")
        assert result.permanent == ("gone@y.org",)
        assert [o.reply.code for o in result.outcomes if o.reply] == [550]
        assert client.send("a@x.org", ["b@y.org"], b"y\r\n").accepted == ("b@y.org",)
        assert client.connections_opened == 2  # a connection whose RSET failed is not trusted again
    assert server.commands(1)[-1] == "RSET"


def test_rset_dropped_is_ignored(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED,
        per_recipient={"gone@y.org": b"550 5.1.1 gone\r\n"},
        faults={"rset": Fault("drop")},
    )
    client = SmtpClient.from_url(url(server.port))
    result = client.send("a@x.org", ["gone@y.org"], b"x\r\n")
    assert result.permanent == ("gone@y.org",)
    assert client.state is SessionState.CLOSED
    client.close()


def test_a_data_refusal_is_per_recipient_and_the_connection_stays(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED,
        faults={"data_end": Fault("reply", b"554 5.6.0 content rejected\r\n", occurrence=1)},
    )
    with SmtpClient.from_url(url(server.port)) as client:
        refused = client.send("a@x.org", ["b@y.org", "c@y.org"], b"spam\r\n")
        assert refused.permanent == ("b@y.org", "c@y.org")
        assert {o.stage for o in refused.outcomes} == {Stage.DATA_END}
        assert client.send("a@x.org", ["b@y.org"], b"ham\r\n").accepted == ("b@y.org",)
        assert client.connections_opened == 1
    assert "RSET" in server.commands(1)


def test_chunking_drop_after_the_group_left_is_unknown_and_never_resent(scripted_server: Scripted) -> None:
    """With CHUNKING the data leaves in the same write as MAIL, so a drop before any reply may follow an
    accepted message: the outcome is unknown and the client does not resend on its own (no free reconnect;
    a stale idle connection is caught before reuse instead)."""
    server = scripted_server(
        ehlo_keywords=[*PIPELINED, "CHUNKING"],
        faults={"mail": Fault("drop", occurrence=2)},
        faults_on_connection=1,
    )
    with SmtpClient.from_url(url(server.port)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        with pytest.raises(UnknownOutcome):
            client.send("a@x.org", ["b@y.org"], b"two\r\n")
    assert server.connection_count == 1
    assert len(server.messages) == 1


def test_a_connection_whose_server_refused_mail_with_a_4xx_is_not_used_again(
    scripted_server: Scripted,
) -> None:
    """OpenSMTPD answers every MAIL past its per-session cap (``max-mails``, 100) with ``452 4.5.3 Too many
    messages sent`` for as long as the session lasts: ``make interop`` saw a kept connection defer every
    retry of 36 mails that way until its ``max_age``. After a 4xx to MAIL the next message goes on a new
    connection (and the refused one is retried there by the queue)."""
    server = scripted_server(ehlo_keywords=PIPELINED, max_mails=2)
    with SmtpClient.from_url(url(server.port)) as client:
        first = [client.send("a@x.org", ["b@y.org"], b"m%d\r\n" % i) for i in range(3)]
        after = client.send("a@x.org", ["b@y.org"], b"m3\r\n")
    assert first[2].reply is not None and first[2].reply.code == 452
    assert first[2].with_status(RecipientStatus.TRANSIENT) == ("b@y.org",)
    assert after.accepted == ("b@y.org",)
    assert after.conn_id != first[0].conn_id
    assert server.connection_count == 2
    assert [m.data for m in server.messages] == [b"m0\r\n", b"m1\r\n", b"m3\r\n"]
