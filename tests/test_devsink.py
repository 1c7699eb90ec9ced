"""Self-tests of dispatcher.dev.devsink (the recording SMTP sink), with smtplib and raw sockets as clients."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import free_port, wait_until
from servers.recording import OVERLONG_LINE, RecordingSmtpServer, Rule, parse_rule

from dispatcher.errors import ConfigurationError

SinkFactory = Callable[..., RecordingSmtpServer]
SOFT = "4.2.0 Temporarily unavailable (devsink rule)"
HARD = "5.1.1 Mailbox unavailable (devsink rule)"


def read_replies(sock: socket.socket, count: int) -> list[bytes]:
    """Read until ``count`` complete SMTP replies (final lines ``NNN `` ) arrived; return the final lines."""
    buffer = b""
    finals: list[bytes] = []
    while len(finals) < count:
        data = sock.recv(65536)
        assert data, f"server closed after {finals!r}"
        buffer += data
        *lines, buffer = buffer.split(b"\r\n")
        finals += [line for line in lines if line[3:4] == b" "]
    return finals


def test_records_command_lines_verbatim_and_exact_message_bytes(smtp_server: SinkFactory) -> None:
    sink = smtp_server()
    body = b"Subject: hi\r\n\r\n.leading dot\r\nline\r\n"
    with smtplib.SMTP("127.0.0.1", sink.port, local_hostname="client.test") as client:
        client.ehlo()
        assert client.docmd("MaIl", "FROM:<a@x.org>")[0] == 250
        assert client.docmd("RCPT", "TO:<b@x.org>")[0] == 250
        assert client.docmd("NOOP")[0] == 250
        assert client.data(body)[0] == 250  # smtplib dot-stuffs ".leading" on the wire
    messages = sink.wait_for_messages(1, timeout=5)
    assert messages[0].data == body
    message = messages[0]
    assert (message.mail_from, message.rcpt_tos, message.connection_id) == ("a@x.org", ["b@x.org"], 1)
    wait_until(lambda: sink.active_connections == 0, timeout=5)
    assert sink.commands == [
        (1, "ehlo client.test"),
        (1, "MaIl FROM:<a@x.org>"),
        (1, "RCPT TO:<b@x.org>"),
        (1, "NOOP"),
        (1, "data"),
        (1, "QUIT"),
    ]
    assert (sink.connections, sink.max_active_connections, sink.ehlo_count) == (1, 1, 1)


def test_unknown_and_overlong_lines_are_recorded(smtp_server: SinkFactory) -> None:
    sink = smtp_server()
    with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c\r\nXYZZY 1\r\n" + b"A" * 3000 + b"\r\nNOOP\r\n")
        replies = read_replies(sock, 4)
    assert [r[:3] for r in replies] == [b"250", b"500", b"500", b"250"]
    assert sink.command_lines(1) == ["EHLO c", "XYZZY 1", OVERLONG_LINE, "NOOP"]


def test_ehlo_advertises_pipelining_and_pipelined_group_is_answered(smtp_server: SinkFactory) -> None:
    sink = smtp_server()
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.ehlo()
        for keyword in ("pipelining", "size", "8bitmime", "smtputf8"):
            assert client.has_extn(keyword), keyword
        assert not client.has_extn("auth") and not client.has_extn("starttls")
    with socket.create_connection(("127.0.0.1", sink.port), timeout=5) as sock:
        read_replies(sock, 1)
        sock.sendall(b"EHLO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n")
        assert [r[:3] for r in read_replies(sock, 4)] == [b"250", b"250", b"250", b"354"]
        sock.sendall(b"x\r\n.\r\nQUIT\r\n")
        assert [r[:3] for r in read_replies(sock, 2)] == [b"250", b"221"]
    assert sink.wait_for_messages(1, timeout=5)[0].data == b"x\r\n"
    plain = smtp_server(pipelining=False, smtputf8=False)
    with smtplib.SMTP("127.0.0.1", plain.port) as client:
        client.ehlo()
        assert not client.has_extn("pipelining") and not client.has_extn("smtputf8")


def test_rules_refuse_then_accept(smtp_server: SinkFactory) -> None:
    sink = smtp_server(rules=dict([parse_rule("Soft@X.org=450:once"), parse_rule("hard@x.org=550")]))
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        refused = client.sendmail("a@x.org", ["soft@x.org", "hard@x.org", "ok@x.org"], b"m\r\n")
        assert {k: v[0] for k, v in refused.items()} == {"soft@x.org": 450, "hard@x.org": 550}
        refused = client.sendmail("a@x.org", ["SOFT@x.org", "hard@x.org"], b"m\r\n")
        assert {k: v[0] for k, v in refused.items()} == {"hard@x.org": 550}
    assert [m.rcpt_tos for m in sink.wait_for_messages(2, timeout=5)] == [["ok@x.org"], ["SOFT@x.org"]]


def test_rule_with_count_expires_after_that_many_refusals(smtp_server: SinkFactory) -> None:
    sink = smtp_server(rules={"x@y.org": Rule(451, "4.3.0 later", times=2)})
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.ehlo()
        client.mail("a@x.org")
        assert [client.rcpt("x@y.org")[0] for _ in range(3)] == [451, 451, 250]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("soft@example.com=450:once", ("soft@example.com", Rule(450, SOFT, 1))),
        ("Hard@Example.com=550", ("hard@example.com", Rule(550, HARD, None))),
        ("x@y=451:3", ("x@y", Rule(451, SOFT, 3))),
        ("x@y=451:always", ("x@y", Rule(451, SOFT, None))),
    ],
)
def test_parse_rule(spec: str, expected: tuple[str, Rule]) -> None:
    assert parse_rule(spec) == expected


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("nobody", "expected ADDRESS=CODE"),
        ("x@y=abc", "not a number"),
        ("x@y=250", "4xx or 5xx"),
        ("x@y=450:twice", "'once', 'always'"),
        ("x@y=450:0", "at least 1"),
    ],
)
def test_parse_rule_names_the_problem(spec: str, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        parse_rule(spec)


def test_maildir_stores_sortable_eml_files_with_envelope_headers(
    smtp_server: SinkFactory, tmp_path: Path
) -> None:
    sink = smtp_server(maildir=tmp_path / "mail")
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        for n in range(3):
            client.sendmail("a@x.org", ["b@x.org", "c@x.org"], f"Subject: {n}\r\n\r\nbody {n}\r\n".encode())
    messages = sink.wait_for_messages(3, timeout=5)
    files = sorted((tmp_path / "mail").glob("*.eml"))
    assert files == [m.path for m in messages]
    assert files[2].read_bytes() == (
        b"Return-Path: <a@x.org>\r\nX-Original-To: b@x.org\r\nX-Original-To: c@x.org\r\n" + messages[2].data
    )
    assert messages[2].data == b"Subject: 2\r\n\r\nbody 2\r\n"
    assert not list((tmp_path / "mail").glob(".*"))


def test_starttls_with_test_ca_and_required_starttls(
    smtp_server: SinkFactory, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    sink = smtp_server(starttls_context=tls_server_context, require_starttls=True)
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.ehlo()
        assert client.has_extn("starttls")
        assert client.docmd("MAIL", "FROM:<a@x.org>")[0] == 530
        client.starttls(context=tls_client_context)
        client.ehlo()
        assert not client.has_extn("starttls")
        client.sendmail("a@x.org", ["b@x.org"], b"secret\r\n")
    assert sink.wait_for_messages(1, timeout=5)[0].data == b"secret\r\n"
    verbs = [line.split()[0].upper() for line in sink.command_lines()]
    assert verbs == ["EHLO", "MAIL", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_plain_and_login(smtp_server: SinkFactory, mechanism: str) -> None:
    sink = smtp_server(auth_users={"user": "pass word"})
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.ehlo()
        assert set(client.esmtp_features["auth"].split()) == {"PLAIN", "LOGIN"}
        authobject = getattr(client, f"auth_{mechanism.lower()}")
        client.user, client.password = "user", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.auth(mechanism, authobject, initial_response_ok=False)
        client.user, client.password = "user", "pass word"
        code, _ = client.auth(mechanism, authobject, initial_response_ok=False)
        assert code == 235
    auth_lines = [line for line in sink.command_lines() if line.upper().startswith("AUTH")]
    assert auth_lines == [f"AUTH {mechanism}", f"AUTH {mechanism}"]  # credentials are not commands


def test_connection_counters_and_stop_closes_open_connections(smtp_server: SinkFactory) -> None:
    sink = smtp_server()
    first = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    second = socket.create_connection(("127.0.0.1", sink.port), timeout=5)
    try:
        read_replies(first, 1)
        read_replies(second, 1)
        assert (sink.connections, sink.active_connections, sink.max_active_connections) == (2, 2, 2)
        second.close()
        wait_until(lambda: sink.active_connections == 1, timeout=5, message="close not seen")
        sink.stop()
        assert first.recv(100) == b""
    finally:
        first.close()
        second.close()
    assert sink.max_active_connections == 2


def test_wait_for_messages_times_out_with_what_it_saw(smtp_server: SinkFactory) -> None:
    sink = smtp_server()
    with smtplib.SMTP("127.0.0.1", sink.port) as client:
        client.sendmail("a@x.org", ["b@x.org"], b"one\r\n")
    with pytest.raises(TimeoutError, match=r"expected 2 message\(s\).*got 1.*b@x.org"):
        sink.wait_for_messages(2, timeout=0.2)


def test_cli_serves_stores_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    maildir = tmp_path / "mail"
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.dev.devsink", "--port", str(port), "--dir", str(maildir),
         "--rule", "soft@example.com=450:once"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:

        def accepting() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return process.poll() is not None

        wait_until(accepting, timeout=15, message="devsink CLI did not listen")
        assert process.poll() is None
        with smtplib.SMTP("127.0.0.1", port) as client:
            refused = client.sendmail("a@x.org", ["soft@example.com", "b@x.org"], b"hello\r\n")
            assert refused["soft@example.com"][0] == 450
        wait_until(lambda: len(list(maildir.glob("*.eml"))) == 1, timeout=5, message="no .eml stored")
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    events = [json.loads(line) for line in output.splitlines() if line.startswith(b"{")]
    stored = [e for e in events if e["event"] == "devsink_message_stored"]
    assert len(stored) == 1
    assert (stored[0]["from"], stored[0]["to"], stored[0]["size"]) == ("a@x.org", ["b@x.org"], 7)
    assert stored[0]["path"] == str(next(maildir.glob("*.eml")))
