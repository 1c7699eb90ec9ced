"""Transcript events: every command and reply as a structlog event, AUTH redacted, data never logged.

Issue 2, client item 9: "every command sent and reply received is emitted as a structured event — stage,
verb and arguments, code, enhanced code, text, milliseconds, connection id, TLS version — with AUTH
exchanges redacted".
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from client_support import url
from servers import Fault, RecordingSmtpServer, ScriptedSmtpServer

from dispatcher.errors import StageTimeout
from dispatcher.smtp import SmtpClient

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
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", ["b@y.org", "gone@y.org"], f"{BODY_MARKER}\r\n".encode())
        conn_id = client.conn_id
    server.wait_closed(1)
    commands = _of(logs, "smtp_command")
    replies = _of(logs, "smtp_reply")
    # Every line the server received is one smtp_command event, verbatim, in order.
    assert [e["command"] for e in commands] == [line.decode().rstrip("\r\n") for line in server.lines(1)]
    assert [e["stage"] for e in commands] == ["ehlo", "mail", "rcpt", "rcpt", "data", "quit"]
    assert [(e["stage"], e["code"]) for e in replies] == [
        ("greeting", 220),
        ("ehlo", 250),
        ("mail", 250),
        ("rcpt", 250),
        ("rcpt", 550),
        ("data", 354),
        ("data_end", 250),
        ("quit", 221),
    ]
    for event in commands + replies:
        assert event["conn_id"] == conn_id != ""
        assert event["tls"] is None
        assert event["log_level"] == "info"
    for event in replies:
        assert isinstance(event["ms"], float) and 0 <= event["ms"] < 5000
    refused = replies[4]
    assert (refused["enhanced"], refused["text"]) == ("5.1.1", "5.1.1 gone")
    assert replies[1]["text"].splitlines()[0] == "scripted.test"
    (data,) = _of(logs, "smtp_data")
    assert data["bytes"] == len(f"{BODY_MARKER}\r\n.\r\n") and data["stage"] == "data_block"
    assert BODY_MARKER not in repr(logs) and BODY_MARKER not in repr(result.transcript)
    assert result.conn_id == conn_id


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
    established = _of(logs, "smtp_tls_established")
    assert [e["tls"] for e in established] == [version]
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


def test_a_timeout_leaves_the_sent_command_in_the_transcript(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING"], faults={"rcpt": Fault("hang")})
    client = SmtpClient.from_url(url(server.port, timeout_rcpt=0.3))
    with pytest.raises(StageTimeout):
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    lines = [(e["stage"], e.get("line") or e.get("code")) for e in client.last_transcript if e["dir"] != "-"]
    assert ("rcpt", "RCPT TO:<b@y.org>") in lines
    assert ("mail", 250) in lines
    assert not any(stage == "rcpt" and value == 250 for stage, value in lines)
