"""TLS (STARTTLS opportunistic / required, implicit, certificate checks) and AUTH (PLAIN, LOGIN, XOAUTH2).

Issue 2, client items 3 (TLS) and 4 (AUTH); tests: "aiosmtpd ... with STARTTLS (trustme CA), AUTH PLAIN and
LOGIN" and "STARTTLS not offered under 'required' (assert from the server's log that no AUTH or MAIL
arrived)". Implicit TLS: neither test server wraps on connect, so a TLS-terminating ``Relay`` (real
sockets) sits in front of DevSink.
"""

from __future__ import annotations

import base64
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import structlog
import trustme
from client_support import Relay, url
from servers import RecordingSmtpServer, ScriptedSmtpServer

from dispatcher.errors import AuthenticationFailed, PolicyError, ReplyError, TlsError
from dispatcher.smtp import SmtpClient, Stage

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]

USER, PASSWORD = "mailer", "s3cr3t-Pa55:w%rd"
SECRET_FORMS = (
    PASSWORD,
    base64.b64encode(PASSWORD.encode()).decode(),
    base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode(),
)


def _verbs(sink: RecordingSmtpServer) -> list[str]:
    return [line.split(" ", 1)[0].upper() for line in sink.command_lines()]


# --- STARTTLS ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["opportunistic", "required"])
def test_starttls_verifies_with_ca_file_and_says_ehlo_again(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path, mode: str
) -> None:
    sink = smtp_server(starttls_context=tls_server_context)
    with SmtpClient.from_url(url(sink.port, tls=mode, ca_file=tls_ca_file)) as client:
        result = client.send("a@x.org", ["b@y.org"], b"secret body\r\n")
        assert result.accepted == ("b@y.org",)
        assert client.tls_version in ("TLSv1.2", "TLSv1.3")
        assert not client.extensions.starttls  # the extensions are the post-TLS EHLO's
    assert sink.ehlo_count == 2
    assert _verbs(sink)[:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert sink.wait_for_messages(1, 5)[0].data == b"secret body\r\n"


def test_starttls_by_host_name_checks_the_name(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path
) -> None:
    sink = smtp_server(starttls_context=tls_server_context)
    # "localhost" may resolve to ::1 first (refused); the client goes on to 127.0.0.1.
    route = url(sink.port, scheme="smtp+starttls", host="localhost", ca_file=tls_ca_file)
    with SmtpClient.from_url(route) as client:
        assert client.send("a@x.org", ["b@y.org"], b"x\r\n").accepted == ("b@y.org",)
        assert client.tls_version is not None


def test_opportunistic_without_starttls_stays_plaintext(smtp_server: Sink) -> None:
    sink = smtp_server()
    with SmtpClient.from_url(url(sink.port, tls="opportunistic")) as client:
        assert client.send("a@x.org", ["b@y.org"], b"x\r\n").accepted == ("b@y.org",)
        assert client.tls_version is None
        events = [e.get("event") for e in client.last_transcript]
    assert "smtp_tls_unavailable" in events
    assert "STARTTLS" not in _verbs(sink)


def test_opportunistic_starttls_refused_with_454_goes_on_in_plaintext(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["STARTTLS", "PIPELINING"])  # no context: answers 454
    with SmtpClient.from_url(url(server.port, tls="opportunistic")) as client:
        assert client.send("a@x.org", ["b@y.org"], b"x\r\n").accepted == ("b@y.org",)
        assert client.tls_version is None
    assert server.commands(1)[:3] == ["EHLO", "STARTTLS", "MAIL"]


def test_required_starttls_refused_with_454_is_an_error(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["STARTTLS", "AUTH PLAIN"])
    client = SmtpClient.from_url(url(server.port, scheme="smtp+starttls", user=USER, password=PASSWORD))
    with pytest.raises(ReplyError) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.STARTTLS
    assert caught.value.reply is not None and caught.value.reply.code == 454
    server.wait_closed(1)
    assert server.commands(1) == ["EHLO", "STARTTLS"]


def test_required_tls_not_offered_sends_no_auth_and_no_mail(smtp_server: Sink) -> None:
    sink = smtp_server(auth_users={USER: PASSWORD})  # offers AUTH, not STARTTLS
    client = SmtpClient.from_url(url(sink.port, scheme="smtp+starttls", user=USER, password=PASSWORD))
    with pytest.raises(PolicyError) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    error = caught.value
    assert error.stage is Stage.STARTTLS and error.route_level and error.permanent
    assert "STARTTLS" in str(error) and "requires TLS" in str(error)
    assert _verbs(sink) == ["EHLO"]
    assert sink.messages == []
    assert client.state.value == "closed"


def test_required_tls_starttls_pipelines_nothing_after_it(
    scripted_server: Scripted, tls_server_context: ssl.SSLContext, tls_ca_file: Path
) -> None:
    server = scripted_server(
        starttls_context=tls_server_context, ehlo_keywords=["STARTTLS", "PIPELINING", "AUTH PLAIN LOGIN"]
    )
    route = url(server.port, scheme="smtp+starttls", user=USER, password=PASSWORD, ca_file=tls_ca_file)
    with SmtpClient.from_url(route) as client:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    record = server.wait_closed(1)
    assert record.tls and record.discarded_after_starttls == b""
    assert server.commands(1) == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert [(a.mechanism, a.responses) for a in record.auth] == [
        ("PLAIN", [f"\0{USER}\0{PASSWORD}".encode()])
    ]


def test_untrusted_certificate_is_a_tls_error(smtp_server: Sink, tls_server_context: ssl.SSLContext) -> None:
    sink = smtp_server(starttls_context=tls_server_context)
    client = SmtpClient.from_url(url(sink.port, tls="opportunistic"))  # system CAs only
    with pytest.raises(TlsError) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.TLS_HANDSHAKE and caught.value.route_level
    assert "verif" in str(caught.value).lower()
    assert "MAIL" not in _verbs(sink) and sink.messages == []


def test_certificate_for_another_name_is_a_tls_error(
    smtp_server: Sink, tls_ca: trustme.CA, tls_ca_file: Path
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("mail.example.org").configure_cert(context)
    sink = smtp_server(starttls_context=context)
    client = SmtpClient.from_url(url(sink.port, scheme="smtp+starttls", ca_file=tls_ca_file))
    with pytest.raises(TlsError) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.TLS_HANDSHAKE
    assert "MAIL" not in _verbs(sink)


def test_insecure_skip_verify_accepts_an_untrusted_certificate(
    smtp_server: Sink, tls_server_context: ssl.SSLContext
) -> None:
    sink = smtp_server(starttls_context=tls_server_context)
    with SmtpClient.from_url(url(sink.port, scheme="smtp+starttls", insecure_skip_verify=True)) as client:
        assert client.send("a@x.org", ["b@y.org"], b"x\r\n").accepted == ("b@y.org",)
        assert client.tls_version is not None


# --- implicit TLS (RFC 8314) ------------------------------------------------------------------------


def test_implicit_tls_through_a_tls_terminating_relay(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path
) -> None:
    sink = smtp_server()
    with Relay(sink.port, server_context=tls_server_context) as relay:
        route = url(relay.port, scheme="smtps", ca_file=tls_ca_file)
        with SmtpClient.from_url(route) as client:
            assert client.send("a@x.org", ["b@y.org"], b"over tls\r\n").accepted == ("b@y.org",)
            assert client.tls_version is not None
        assert relay.handshake_errors == []
    assert _verbs(sink) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]  # no STARTTLS inside implicit TLS
    assert sink.wait_for_messages(1, 5)[0].data == b"over tls\r\n"


def test_implicit_tls_with_untrusted_certificate_is_a_tls_error(
    smtp_server: Sink, tls_server_context: ssl.SSLContext
) -> None:
    sink = smtp_server()
    with Relay(sink.port, server_context=tls_server_context) as relay:
        client = SmtpClient.from_url(url(relay.port, scheme="smtps"))
        with pytest.raises(TlsError) as caught:
            client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.TLS_HANDSHAKE
    assert sink.commands == []


def test_implicit_tls_against_a_plaintext_server_fails_fast(scripted_server: Scripted) -> None:
    server = scripted_server()
    client = SmtpClient.from_url(url(server.port, scheme="smtps", timeout=2))
    with pytest.raises(TlsError) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.TLS_HANDSHAKE
    assert server.messages == []


# --- AUTH -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mechanism", ["plain", "login"])
def test_auth_over_starttls(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path, mechanism: str
) -> None:
    sink = smtp_server(starttls_context=tls_server_context, auth_users={USER: PASSWORD})
    route = url(
        sink.port, scheme="smtp+starttls", user=USER, password=PASSWORD, ca_file=tls_ca_file, auth=mechanism
    )
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(route) as client:
        result = client.send("a@x.org", ["b@y.org"], b"x\r\n")
        transcript = client.last_transcript
        shown = repr(client)
    assert result.accepted == ("b@y.org",)
    lines = sink.command_lines()
    auth_lines = [line for line in lines if line.upper().startswith("AUTH")]
    assert len(auth_lines) == 1 and auth_lines[0].upper().startswith(f"AUTH {mechanism.upper()}")
    assert [v for v in _verbs(sink) if v != "AUTH"][:3] == ["EHLO", "STARTTLS", "EHLO"]
    assert _verbs(sink).index("AUTH") > _verbs(sink).index("STARTTLS")
    _assert_no_secret(shown, repr(transcript), repr(result), repr(logs))


def test_plain_is_preferred_when_both_are_offered(smtp_server: Sink) -> None:
    sink = smtp_server(auth_users={USER: PASSWORD})
    route = url(sink.port, user=USER, password=PASSWORD, allow_plaintext_auth=True)
    with SmtpClient.from_url(route) as client:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    (auth,) = [line for line in sink.command_lines() if line.upper().startswith("AUTH")]
    assert auth.startswith("AUTH PLAIN ")


def test_auth_over_plaintext_only_when_allowed(smtp_server: Sink) -> None:
    sink = smtp_server(auth_users={USER: PASSWORD})
    refused = SmtpClient.from_url(url(sink.port, user=USER, password=PASSWORD))
    with pytest.raises(PolicyError) as caught:
        refused.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.AUTH and caught.value.route_level
    assert "plaintext" in str(caught.value)
    _assert_no_secret(str(caught.value), repr(refused))
    assert _verbs(sink) == ["EHLO"]
    route = url(sink.port, user=USER, password=PASSWORD, allow_plaintext_auth=True, auth="login")
    with SmtpClient.from_url(route) as allowed:
        assert allowed.send("a@x.org", ["b@y.org"], b"x\r\n").accepted == ("b@y.org",)
    assert _verbs(sink)[1:] == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert len(sink.wait_for_messages(1, 5)) == 1


@pytest.mark.parametrize("mechanism", ["plain", "login"])
def test_wrong_password_is_authentication_failed_with_the_535(
    smtp_server: Sink, tls_server_context: ssl.SSLContext, tls_ca_file: Path, mechanism: str
) -> None:
    wrong = "wr0ng-Secret!"
    sink = smtp_server(starttls_context=tls_server_context, auth_users={USER: PASSWORD})
    route = url(
        sink.port, scheme="smtp+starttls", user=USER, password=wrong, ca_file=tls_ca_file, auth=mechanism
    )
    client = SmtpClient.from_url(route)
    with structlog.testing.capture_logs() as logs, pytest.raises(AuthenticationFailed) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    error = caught.value
    assert error.reply is not None and error.reply.code == 535
    assert error.stage is Stage.AUTH and error.permanent and error.route_level
    assert "535" in str(error)
    assert "MAIL" not in _verbs(sink) and sink.messages == []
    forms = (
        wrong,
        base64.b64encode(wrong.encode()).decode(),
        base64.b64encode(f"\0{USER}\0{wrong}".encode()).decode(),
    )
    for text in (str(error), repr(error), repr(client), repr(client.last_transcript), repr(logs)):
        for form in forms:
            assert form not in text


def test_xoauth2_when_forced(scripted_server: Scripted) -> None:
    token = "ya29.token-VALUE"
    server = scripted_server(ehlo_keywords=["AUTH PLAIN LOGIN XOAUTH2", "PIPELINING"])
    route = url(server.port, user=USER, password=token, auth="xoauth2", allow_plaintext_auth=True)
    with structlog.testing.capture_logs() as logs, SmtpClient.from_url(route) as client:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
        transcript = client.last_transcript
    record = server.wait_closed(1)
    assert [(a.mechanism, a.responses) for a in record.auth] == [
        ("XOAUTH2", [f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()])
    ]
    assert token not in repr(transcript) and token not in repr(logs)


def test_forced_mechanism_not_offered_is_a_policy_error(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["AUTH LOGIN"])
    route = url(server.port, user=USER, password=PASSWORD, auth="plain", allow_plaintext_auth=True)
    with pytest.raises(PolicyError) as caught:
        SmtpClient.from_url(route).send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.AUTH
    server.wait_closed(1)
    assert "AUTH" not in server.commands(1) and "MAIL" not in server.commands(1)


def _assert_no_secret(*texts: str) -> None:
    for text in texts:
        for form in SECRET_FORMS:
            assert form not in text, f"secret leaked: {text[:300]}"
