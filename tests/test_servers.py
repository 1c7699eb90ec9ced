"""Self-tests of the test servers: ScriptedSmtpServer (faults, BDAT, round trips, TLS) and RedisServer."""

from __future__ import annotations

import smtplib
import socket
import ssl
from collections.abc import Callable

import pytest
import redis
from helpers import wait_until
from servers.redis_server import RedisServer
from servers.scripted import Fault, ScriptedSmtpServer

from dispatcher.smtp.stages import Stage

Scripted = Callable[..., ScriptedSmtpServer]


class RawClient:
    """A bare socket SMTP client: send exact bytes, read whole replies."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def replies(self, count: int) -> list[bytes]:
        """The next ``count`` replies, each with all its lines (CRLF kept)."""
        out: list[bytes] = []
        current = b""
        while len(out) < count:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                assert data, f"closed by server after {out!r}"
                self.buffer += data
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            current += line + b"\r\n"
            if line[3:4] != b"-":
                out.append(current)
                current = b""
        return out

    def codes(self, count: int) -> list[int]:
        return [int(reply[:3]) for reply in self.replies(count)]

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.sock.close()


def test_plain_dialogue_records_lines_and_message(scripted_server: Scripted) -> None:
    server = scripted_server()
    body = b"Subject: x\r\n\r\n.dot line\r\nend\r\n"
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="c.test") as client:
        assert client.sendmail("a@x.org", ["b@x.org"], body) == {}
    message = server.wait_for_messages(1)[0]
    assert message.raw == b"Subject: x\r\n\r\n..dot line\r\nend\r\n.\r\n"
    assert message.data == body
    assert (message.mail_from, message.rcpt_tos, message.via) == ("a@x.org", ["b@x.org"], "DATA")
    assert message.final_reply is not None and message.final_reply.startswith(b"250 ")
    assert server.lines(1)[:2] == [b"ehlo c.test\r\n", b"mail FROM:<a@x.org> size=30\r\n"]
    assert server.wait_closed(1).ended == "quit"


def test_data_terminator_first_and_bare_lf_is_not_a_terminator(scripted_server: Scripted) -> None:
    server = scripted_server()
    client = RawClient(server.port)
    client.replies(1)
    client.send(b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n")
    assert client.codes(4) == [250, 250, 250, 354]
    client.send(b".\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n")
    assert client.codes(4) == [250, 250, 250, 354]
    client.send(b"a\n.\nb\r\n.\r\n")
    assert client.codes(1) == [250]
    client.close()
    first, second = server.wait_for_messages(2)
    assert (first.mail_from, first.raw, first.data) == ("", b".\r\n", b"")
    assert (second.raw, second.data) == (b"a\n.\nb\r\n.\r\n", b"a\n.\nb\r\n")


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "data_end", "rset", "noop"])
def test_drop_at_each_stage_closes_without_answer(scripted_server: Scripted, stage: str) -> None:
    server = scripted_server(faults={stage: Fault("drop")})
    client = RawClient(server.port)
    dialogue = [
        ("greeting", b""),
        ("ehlo", b"EHLO c\r\n"),
        ("mail", b"MAIL FROM:<a@x.org>\r\n"),
        ("rcpt", b"RCPT TO:<b@x.org>\r\n"),
        ("data", b"DATA\r\n"),
        ("data_end", b"hi\r\n.\r\n"),
        ("rset", b"RSET\r\n"),
        ("noop", b"NOOP\r\n"),
    ]
    for name, command in dialogue:
        client.send(command)
        if name == stage:
            break
        client.replies(1)
    assert client.sock.recv(100) == b""
    record = server.wait_closed(1)
    assert (record.fault_fired, record.ended) == (stage, "fault")
    assert len(server.messages) == (1 if stage in ("data_end", "rset", "noop") else 0)
    client.close()


def test_reply_fault_with_421_closes_and_stage_enum_keys_work(scripted_server: Scripted) -> None:
    server = scripted_server(faults={Stage.MAIL: Fault("reply", b"421 4.3.2 shutting down\r\n")})
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            client.sendmail("a@x.org", ["b@x.org"], b"x\r\n")
        assert refused.value.smtp_code == 421
    assert server.wait_closed(1).ended == "fault"


def test_split_fault_sends_one_byte_per_segment_and_parses(scripted_server: Scripted) -> None:
    server = scripted_server(faults={"ehlo": Fault("split")}, ehlo_keywords=["PIPELINING", "SIZE 1000"])
    client = RawClient(server.port)
    client.replies(1)
    client.send(b"EHLO c\r\n")
    pieces: list[bytes] = []
    expected = b"250-scripted.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n"
    while sum(map(len, pieces)) < len(expected):
        pieces.append(client.sock.recv(65536))
    assert b"".join(pieces) == expected
    client.close()
    assert server.wait_closed(1).writes == 1 + len(expected)  # greeting, then one write per byte
    with smtplib.SMTP("127.0.0.1", server.port) as smtp:
        smtp.ehlo()
        assert smtp.has_extn("pipelining") and smtp.esmtp_features["size"] == "1000"


def test_hang_keeps_socket_open_until_stop(scripted_server: Scripted) -> None:
    server = scripted_server(faults={"data_end": Fault("hang")})
    client = RawClient(server.port, timeout=0.3)
    client.replies(1)
    client.send(b"EHLO c\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nDATA\r\n")
    assert client.codes(4) == [250, 250, 250, 354]
    client.send(b"body\r\n.\r\n")
    with pytest.raises(TimeoutError):
        client.sock.recv(100)
    client.send(b"QUIT\r\n")
    wait_until(lambda: bytes(server.records[0].received_while_hung) == b"QUIT\r\n", timeout=5)
    message = server.wait_for_messages(1)[0]
    assert (message.data, message.final_reply) == (b"body\r\n", None)
    client.sock.settimeout(5)
    server.stop()
    assert client.sock.recv(100) == b""
    assert server.records[0].ended == "stopped"
    client.close()


def test_faults_on_nth_connection_occurrence_and_per_recipient(scripted_server: Scripted) -> None:
    server = scripted_server(
        faults={"rcpt": Fault("reply", b"452 4.5.3 too many\r\n", occurrence=2)},
        faults_on_connection=2,
        per_recipient={"Soft@x.org": b"450 4.2.1 busy\r\n"},
    )
    recipients = ["a@x.org", "b@x.org", "soft@x.org"]
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        refused = client.sendmail("s@x.org", recipients, b"1\r\n")
        assert {k: v[0] for k, v in refused.items()} == {"soft@x.org": 450}
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        refused = client.sendmail("s@x.org", recipients, b"2\r\n")
        assert {k: v[0] for k, v in refused.items()} == {"b@x.org": 452, "soft@x.org": 450}
    assert [m.rcpt_tos for m in server.wait_for_messages(2)] == [["a@x.org", "b@x.org"], ["a@x.org"]]


def test_reply_overrides_apply_to_every_connection(scripted_server: Scripted) -> None:
    server = scripted_server(replies={"noop": b"250-first\r\n250 second\r\n"}, faults_on_connection=99)
    for _ in range(2):
        with smtplib.SMTP("127.0.0.1", server.port) as client:
            assert client.noop() == (250, b"first\nsecond")


def test_raw_script_sends_exact_bytes_per_send(scripted_server: Scripted) -> None:
    script = [b"220 hi\r\n250 extra\r\n", b"garbage\x00\xff\r\n", b"2" * 5000]
    server = scripted_server(raw_script=script, after_raw_script="close")
    client = RawClient(server.port)
    received = b""
    while data := client.sock.recv(65536):
        received += data
    assert received == b"".join(script)
    client.close()
    dialogue = scripted_server(raw_script=[b"220-a\r\n", b"220 b\r\n"], after_raw_script="dialogue")
    with smtplib.SMTP("127.0.0.1", dialogue.port) as smtp:
        assert smtp.noop()[0] == 250


def test_bdat_chunks_and_round_trip_counting(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING", "CHUNKING"])
    client = RawClient(server.port)
    client.replies(1)
    client.send(b"EHLO c\r\n")
    client.replies(1)
    for n in range(2):
        client.send(
            b"MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\nBDAT 5\r\n\r\n.\r\nBDAT 3 LAST\r\nEND"
        )
        assert client.codes(4) == [250, 250, 250, 250], n
    client.send(b"QUIT\r\n")
    assert client.codes(1) == [221]
    client.close()
    messages = server.wait_for_messages(2)
    assert messages[0].chunks == [b"\r\n.\r\n", b"END"] and messages[0].data == b"\r\n.\r\nEND"
    assert messages[1].via == "BDAT"
    record = server.wait_closed(1)
    assert record.round_trips == 2  # one per message: the wait after its replies
    assert record.waits == 4  # plus the waits after the greeting and after EHLO


def test_round_trips_of_unpipelined_smtplib(scripted_server: Scripted) -> None:
    server = scripted_server()
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.sendmail("a@x.org", ["b@x.org"], b"x\r\n")
    # MAIL, RCPT, DATA and the final dot each make smtplib wait for the reply.
    assert server.wait_closed(1).round_trips == 4
    assert server.round_trips == 4


def test_starttls_discards_pipelined_bytes_and_auth_is_recorded(
    scripted_server: Scripted, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    server = scripted_server(
        starttls_context=tls_server_context, ehlo_keywords=["STARTTLS", "AUTH PLAIN LOGIN"]
    )
    client = RawClient(server.port)
    client.replies(1)
    client.send(b"EHLO c\r\nSTARTTLS\r\nMAIL FROM:<injected@x.org>\r\n")
    assert b"STARTTLS" in client.replies(1)[0]
    assert client.codes(1) == [220]
    client.sock = tls_client_context.wrap_socket(client.sock, server_hostname="127.0.0.1")
    client.send(b"EHLO c\r\n")
    assert b"STARTTLS" not in client.replies(1)[0]
    client.send(b"AUTH PLAIN AHUAcHc=\r\nQUIT\r\n")
    assert client.codes(2) == [235, 221]
    client.close()
    record = server.wait_closed(1)
    assert record.tls and record.discarded_after_starttls == b"MAIL FROM:<injected@x.org>\r\n"
    assert [(a.mechanism, a.responses) for a in record.auth] == [("PLAIN", [b"\x00u\x00pw"])]
    assert b"MAIL FROM:<injected@x.org>\r\n" not in server.lines(1)


def test_auth_login_and_refusal_with_smtplib(
    scripted_server: Scripted, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    server = scripted_server(
        starttls_context=tls_server_context,
        ehlo_keywords=["STARTTLS", "AUTH LOGIN"],
        auth_reply=b"535 5.7.8 no\r\n",
    )
    with smtplib.SMTP("127.0.0.1", server.port) as client:
        client.starttls(context=tls_client_context)
        with pytest.raises(smtplib.SMTPAuthenticationError):
            client.login("user", "secret")
    record = server.wait_closed(1)
    assert [(a.mechanism, a.responses) for a in record.auth] == [("LOGIN", [b"user", b"secret"])]


def test_tls_handshake_fault_sends_plaintext_instead(
    scripted_server: Scripted, tls_server_context: ssl.SSLContext, tls_client_context: ssl.SSLContext
) -> None:
    server = scripted_server(
        starttls_context=tls_server_context,
        ehlo_keywords=["STARTTLS"],
        faults={"tls_handshake": Fault("reply", b"not tls at all\r\n")},
    )
    with smtplib.SMTP("127.0.0.1", server.port) as client, pytest.raises((ssl.SSLError, ConnectionError)):
        client.starttls(context=tls_client_context)
    assert server.wait_closed(1).fault_fired == "tls_handshake"


def test_redis_server_answers_ping_and_redis_url_is_private(
    redis_server: RedisServer, redis_url: str
) -> None:
    assert redis_server.port != 6379
    assert redis_url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.ping()
        assert client.dbsize() == 0
        client.set("left-behind", "1")  # the next test's redis_url must not see it
    finally:
        client.close()


def test_redis_url_flushes_between_tests(redis_client: redis.Redis) -> None:
    assert redis_client.dbsize() == 0


def test_redis_restart_keeps_data_with_appendonly(make_redis_server: Callable[..., RedisServer]) -> None:
    server = make_redis_server(appendonly=True)
    port = server.port
    client = server.client()
    client.set("kept", "yes")
    client.close()
    server.restart()
    assert server.port == port
    client = server.client()
    try:
        assert client.get("kept") == b"yes"
    finally:
        client.close()
    volatile = make_redis_server()
    client = volatile.client()
    client.set("lost", "1")
    client.close()
    volatile.restart()
    client = volatile.client()
    try:
        assert client.get("lost") is None
    finally:
        client.close()
