"""Transcript events: every command and reply as a structlog event, AUTH redacted, data never logged.

At INFO a transaction is one ``smtp_transaction`` event with its lines (issue 15), each line its own
event at DEBUG; the connection's own lines (greeting, EHLO, STARTTLS, AUTH, QUIT) stay INFO events.

Issue 2, client item 9: "every command sent and reply received is emitted as a structured event — stage,
verb and arguments, code, enhanced code, text, milliseconds, connection id, TLS version — with AUTH
exchanges redacted".
"""

from __future__ import annotations

import base64
import io
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from client_support import url
from servers import Fault, RecordingSmtpServer, ScriptedSmtpServer

from dispatcher.errors import StageTimeout
from dispatcher.logs import configure_logging
from dispatcher.smtp import SmtpClient
from dispatcher.smtp.stream import Outgoing

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]

USER, PASSWORD = "mailer", "Tr4nscript-Secret"
BODY_MARKER = "BODY-MARKER-7f3a"


def _of(logs: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == event]


def test_every_command_and_reply_is_an_event(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=["PIPELINING", "ENHANCEDSTATUSCODES", "SIZE 100000"],
        per_recipient={"gone@y.org": b"550 5.1.1 gone\r\n"},
    )
    data = f"{BODY_MARKER}\r\n".encode()
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", ["b@y.org", "gone@y.org"], data)
        conn_id = client.conn_id
    server.wait_closed(1)
    commands = _of(logs, "smtp_command")
    replies = _of(logs, "smtp_reply")
    # Every line the server received is one smtp_command event, verbatim, in order: the connection's own
    # at INFO, the transaction's at DEBUG.
    wire = [line.decode().rstrip("\r\n") for line in server.lines(1)]
    assert [e["command"] for e in commands] == wire
    assert [(e["stage"], e["log_level"]) for e in commands] == [
        ("ehlo", "info"),
        ("mail", "debug"),
        ("rcpt", "debug"),
        ("rcpt", "debug"),
        ("data", "debug"),
        ("quit", "info"),
    ]
    assert [(e["stage"], e["code"], e["log_level"]) for e in replies] == [
        ("greeting", 220, "info"),
        ("ehlo", 250, "info"),
        ("mail", 250, "debug"),
        ("rcpt", 250, "debug"),
        ("rcpt", 550, "debug"),
        ("data", 354, "debug"),
        ("data_end", 250, "debug"),
        ("quit", 221, "info"),
    ]
    for event in commands + replies:
        assert event["conn_id"] == conn_id != ""
        assert event["tls"] is None
    for event in replies:
        assert isinstance(event["ms"], float) and 0 <= event["ms"] < 5000
    refused = replies[4]
    assert (refused["enhanced"], refused["text"]) == ("5.1.1", "5.1.1 gone")
    assert replies[1]["text"].splitlines()[0] == "scripted.test"
    (block,) = _of(logs, "smtp_data")
    assert (
        block["bytes"] == len(data) + 3 and block["stage"] == "data_block" and block["log_level"] == "debug"
    )
    # The transaction is one INFO event carrying its lines in the order they went and came.
    (tx,) = _of(logs, "smtp_transaction")
    assert (tx["log_level"], tx["conn_id"], tx["tls"]) == ("info", conn_id, None) and "error" not in tx
    ms = [e["ms"] for e in replies[2:7]]
    assert tx["lines"] == [
        f"mail > {wire[1]}",
        "rcpt > RCPT TO:<b@y.org>",
        "rcpt > RCPT TO:<gone@y.org>",
        "data > DATA",
        f"mail < 250 2.1.0 Ok ({ms[0]} ms)",
        f"rcpt < 250 2.1.5 Ok ({ms[1]} ms)",
        f"rcpt < 550 5.1.1 gone ({ms[2]} ms)",
        f"data < 354 End data with <CR><LF>.<CR><LF> ({ms[3]} ms)",
        f"data_block > <{len(data) + 3} bytes of message data>",
        f"data_end < 250 {replies[6]['text']} ({ms[4]} ms)",
    ]
    assert isinstance(tx["ms"], float) and tx["ms"] >= 0
    # At INFO every line the client sent is logged once: the connection's events, or the transaction's.
    at_info = [e["command"] for e in commands if e["log_level"] == "info"]
    in_tx = [line.split(" > ", 1)[1] for line in tx["lines"] if " > " in line]
    assert sorted(at_info + in_tx[:-1]) == sorted(wire)  # (the last one is the data's size)
    assert BODY_MARKER not in repr(logs) and BODY_MARKER not in repr(result.transcript)
    assert result.conn_id == conn_id


def test_at_info_a_message_is_one_event_and_its_commands_never_reach_the_chain(
    scripted_server: Scripted,
) -> None:
    """``configure_logging`` at INFO: the per-line DEBUG events are dropped before any processor runs
    (``capture_logs`` swaps the chain's contents, not the level), one ``smtp_transaction`` per message."""
    server = scripted_server(ehlo_keywords=["PIPELINING", "ENHANCEDSTATUSCODES"])
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(url(server.port)) as client:
        for i in range(3):
            client.send("a@x.org", [f"b{i}@y.org"], b"x\r\n")
    names = [e["event"] for e in logs]
    assert [e["log_level"] for e in logs if e["log_level"] == "debug"] == []
    assert names.count("smtp_transaction") == 3
    assert [e["stage"] for e in logs if e["event"] == "smtp_command"] == ["ehlo", "quit"]
    assert "smtp_data" not in names
    for i, tx in enumerate(e for e in logs if e["event"] == "smtp_transaction"):
        assert f"rcpt > RCPT TO:<b{i}@y.org>" in tx["lines"]
    with SmtpClient.from_url(url(server.port)) as client:  # rendered as JSON lines, one per event
        client.send("a@x.org", ["c@y.org"], b"x\r\n")
    rendered = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [e["event"] for e in rendered].count("smtp_transaction") == 1
    assert all(e["level"] != "debug" for e in rendered)


def test_a_streamed_message_is_one_event_with_its_own_lines_and_context(smtp_server: Sink) -> None:
    """The stream interleaves messages (one's data with the next one's envelope): each transaction's
    event still carries only its own lines, in its own log context."""
    sink = smtp_server()
    items = [
        Outgoing(f"m{i}", "f@x.org", (f"r{i}@y.org",), b"Subject: x\r\n\r\nb\r\n", {"message_id": f"<m{i}>"})
        for i in range(4)
    ]
    with (
        structlog.testing.capture_logs([structlog.contextvars.merge_contextvars]) as logs,
        SmtpClient.from_url(url(sink.port)) as client,
    ):
        outcomes = list(client.send_stream(iter(items)))
    structlog.contextvars.clear_contextvars()
    assert len(outcomes) == 4
    txs = _of(logs, "smtp_transaction")
    assert [tx["message_id"] for tx in txs] == [f"<m{i}>" for i in range(4)]
    for i, tx in enumerate(txs):
        sent = [line for line in tx["lines"] if " > " in line]
        assert sent[-4:-1] == [
            "mail > MAIL FROM:<f@x.org> SIZE=17",
            f"rcpt > RCPT TO:<r{i}@y.org>",
            "data > DATA",
        ]
        assert sent[0] == ("rset > RSET" if i else "mail > MAIL FROM:<f@x.org> SIZE=17")
        assert sent[-1] == "data_block > <20 bytes of message data>"
        assert tx["lines"][-1].startswith("data_end < 250 ")
    for e in _of(logs, "smtp_command"):  # each line's DEBUG event is in its message's context too
        if e["stage"] == "rcpt":
            assert e["command"] == f"RCPT TO:<r{e['message_id'][2]}@y.org>"


def test_send_result_transcript_is_the_sends_own(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING"])
    with SmtpClient.from_url(url(server.port)) as client:
        first = client.send("a@x.org", ["b@y.org"], b"1\r\n")
        second = client.send("a@x.org", ["c@y.org"], b"2\r\n")
        assert client.last_transcript == second.transcript
    first_lines = [e.get("line") for e in first.transcript if e["dir"] == "C"]
    second_lines = [e.get("line") for e in second.transcript if e["dir"] == "C"]
    assert first_lines[:2] == ["EHLO client.test", "MAIL FROM:<a@x.org>"]
    assert second_lines == [
        "MAIL FROM:<a@x.org>",
        "RCPT TO:<c@y.org>",
        "DATA",
        "<6 bytes of message data>",
    ]  # "2\r\n.\r\n" on the wire
    final = [e for e in second.transcript if e["dir"] == "S"][-1]
    assert (final["stage"], final["code"], final["enhanced"]) == ("data_end", 250, "2.0.0")
    assert isinstance(final["ms"], float)


@pytest.mark.parametrize("mechanism", ["plain", "login"])
def test_auth_is_redacted_and_tls_version_is_in_every_event_after_starttls(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path, mechanism: str
) -> None:
    sink = smtp_server(starttls_context=tls_server_context, auth_users={USER: PASSWORD})
    route = url(
        sink.port, scheme="smtp+starttls", user=USER, password=PASSWORD, ca_file=tls_ca_file, auth=mechanism
    )
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(route) as client:
        result = client.send("a@x.org", ["b@y.org"], b"x\r\n")
        version = client.tls_version
    assert version is not None
    commands = _of(logs, "smtp_command")
    auth = [e["command"] for e in commands if e["stage"] == "auth"]
    if mechanism == "plain":
        assert auth == ["AUTH PLAIN <redacted>"]
    else:
        assert auth == ["AUTH LOGIN", "<redacted>", "<redacted>"]
    auth_replies = [e["code"] for e in _of(logs, "smtp_reply") if e["stage"] == "auth"]
    assert auth_replies[-1] == 235
    assert [e["tls"] for e in commands] == [None, None] + [version] * (len(commands) - 2)  # EHLO, STARTTLS
    assert {e["log_level"] for e in commands if e["stage"] in ("ehlo", "starttls", "auth")} == {"info"}
    established = _of(logs, "smtp_tls_established")
    assert [e["tls"] for e in established] == [version]
    (tx,) = _of(logs, "smtp_transaction")
    assert tx["tls"] == version and tx["lines"][0].startswith("mail > MAIL FROM:<a@x.org>")
    secrets = (
        PASSWORD,
        base64.b64encode(PASSWORD.encode()).decode(),
        base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
    )
    for text in (repr(logs), repr(result.transcript), repr(client)):
        for secret in secrets:
            assert secret not in text


def test_lifecycle_events_and_new_conn_id_on_reconnect(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=["PIPELINING"], faults={"mail": Fault("drop", occurrence=2)}, faults_on_connection=1
    )
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(url(server.port)) as client:
        first = client.send("a@x.org", ["b@y.org"], b"1\r\n")
        second = client.send("a@x.org", ["b@y.org"], b"2\r\n")
    assert first.conn_id != second.conn_id
    connected = _of(logs, "smtp_connected")
    assert [e["conn_id"] for e in connected] == [first.conn_id, second.conn_id]
    assert connected[0]["port"] == server.port and connected[0]["host"] == "127.0.0.1"
    (reconnect,) = _of(logs, "smtp_reconnect")
    assert reconnect["stage"] == "mail" and reconnect["conn_id"] == first.conn_id
    assert len(_of(logs, "smtp_closed")) == 2
    # The transaction the drop broke is told too, as a warning with its error, before the reconnect.
    txs = _of(logs, "smtp_transaction")
    assert [(e["log_level"], e["conn_id"]) for e in txs] == [
        ("info", first.conn_id),
        ("warning", first.conn_id),
        ("info", second.conn_id),
    ]
    assert txs[1]["error"] and txs[1]["lines"][0] == "mail > MAIL FROM:<a@x.org>"
    assert logs.index(txs[1]) < logs.index(reconnect)


def test_a_timeout_leaves_the_sent_command_in_the_transcript(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING"], faults={"rcpt": Fault("hang")})
    client = SmtpClient.from_url(url(server.port, timeout_rcpt=0.3))
    with structlog.testing.capture_logs() as logs, pytest.raises(StageTimeout):
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    (tx,) = _of(logs, "smtp_transaction")
    assert tx["log_level"] == "warning" and "rcpt" in tx["error"]
    assert "rcpt > RCPT TO:<b@y.org>" in tx["lines"] and not any(x.startswith("rcpt <") for x in tx["lines"])
    lines = [(e["stage"], e.get("line") or e.get("code")) for e in client.last_transcript if e["dir"] != "-"]
    assert ("rcpt", "RCPT TO:<b@y.org>") in lines
    assert ("mail", 250) in lines
    assert not any(stage == "rcpt" and value == 250 for stage, value in lines)
