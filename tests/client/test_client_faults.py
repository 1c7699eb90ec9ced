"""Misbehaving servers: 421, drops and hangs at each stage, split and merged replies, garbage, HELO fallback.

Issue 2, client items 1 (incremental replies, garbage never hangs), 2 (greeting, EHLO → HELO), 7 (reconnect
on 421 / drop), 8 (deadline per stage; silence after the final dot is an *unknown* outcome) and 10 (every
error says stage, transient/permanent, reply); tests: "Scripted faults: replies split one byte at a time;
two replies in one packet; 421 at each stage; a drop at each stage; a hang at each stage (the deadline of
that stage fires); garbage and overlong replies".
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from client_support import StallingServer, url
from helpers import free_port
from servers import Fault, ScriptedSmtpServer

from dispatcher.errors import (
    ConnectError,
    ConnectionLost,
    ProtocolError,
    ReplyError,
    ServiceClosing,
    SmtpError,
    StageTimeout,
    UnknownOutcome,
)
from dispatcher.smtp import SmtpClient, Stage

Scripted = Callable[..., ScriptedSmtpServer]

LOCKSTEP = ["8BITMIME", "SIZE 100000"]
PIPELINED = ["PIPELINING", *LOCKSTEP]
CHUNKING = ["PIPELINING", "CHUNKING", *LOCKSTEP]
KEYWORDS = {"lockstep": LOCKSTEP, "pipelined": PIPELINED, "chunking": CHUNKING}
STAGES = ["greeting", "ehlo", "mail", "rcpt", "data", "data_end"]


def _send(server: ScriptedSmtpServer, **options: object) -> tuple[SmtpClient, Callable[[], object]]:
    client = SmtpClient.from_url(url(server.port, **options))
    return client, lambda: client.send("a@x.org", ["b@y.org"], b"hello\r\n")


def _stages_for(mode: str) -> list[str]:
    # With CHUNKING there is no DATA command: the BDAT LAST reply is the "data_end" stage.
    return [s for s in STAGES if not (mode == "chunking" and s == "data")]


CASES = [(stage, mode) for mode in KEYWORDS for stage in _stages_for(mode)]
CASE_IDS = [f"{stage}-{mode}" for stage, mode in CASES]


def _data_already_sent(stage: str, mode: str) -> bool:
    """True when the message data had gone out before the server's ``stage`` reply was due.

    With CHUNKING, ``MAIL, RCPT, BDAT n LAST`` and the data leave in one write, so silence at MAIL or RCPT
    already leaves the outcome unknown (the server may have processed the lot before failing).
    """
    return stage == "data_end" or (mode == "chunking" and stage in ("mail", "rcpt"))


def _client_stage(stage: str, mode: str) -> Stage:
    """The stage the client names for the server's ``stage``."""
    if stage == "data_end" and mode == "chunking":
        return Stage.BDAT
    return Stage(stage)


# --- 421 --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "mode"), CASES, ids=CASE_IDS)
def test_421_at_each_stage_is_service_closing(scripted_server: Scripted, stage: str, mode: str) -> None:
    server = scripted_server(
        ehlo_keywords=KEYWORDS[mode], faults={stage: Fault("reply", b"421 4.3.2 shutting down\r\n")}
    )
    client, send = _send(server)
    with pytest.raises(ServiceClosing) as caught:
        send()
    error = caught.value
    assert error.transient and error.route_level
    assert error.reply is not None and (error.reply.code, error.reply.enhanced) == (421, "4.3.2")
    assert error.stage is _client_stage(stage, mode)
    assert server.messages == [] or stage == "data_end"
    # before MAIL was accepted the 421 is the connection's fault: one free reconnect (which fails again)
    assert server.connection_count == (2 if stage == "mail" else 1)
    assert client.state.value == "closed"


def test_421_at_mail_reconnects_once_and_the_send_succeeds(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED,
        faults={"mail": Fault("reply", b"421 4.4.2 idle too long\r\n", occurrence=2)},
        faults_on_connection=1,
    )
    with SmtpClient.from_url(url(server.port)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        result = client.send("a@x.org", ["b@y.org"], b"two\r\n")  # reused connection answers 421
        assert result.accepted == ("b@y.org",)
        assert client.connections_opened == 2
        assert any(e.get("event") == "smtp_reconnect" for e in client.last_transcript)
    assert server.connection_count == 2
    assert [(m.connection_id, m.data) for m in server.messages] == [(1, b"one\r\n"), (2, b"two\r\n")]


def test_drop_at_mail_on_a_reused_connection_reconnects(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED, faults={"mail": Fault("drop", occurrence=2)}, faults_on_connection=1
    )
    with SmtpClient.from_url(url(server.port)) as client:
        client.send("a@x.org", ["b@y.org"], b"one\r\n")
        assert client.send("a@x.org", ["b@y.org"], b"two\r\n").accepted == ("b@y.org",)
    assert server.connection_count == 2
    assert [m.data for m in server.messages] == [b"one\r\n", b"two\r\n"]


# --- drops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("stage", "mode"), CASES, ids=CASE_IDS)
def test_drop_at_each_stage(scripted_server: Scripted, stage: str, mode: str) -> None:
    server = scripted_server(ehlo_keywords=KEYWORDS[mode], faults={stage: Fault("drop")})
    client, send = _send(server)
    unknown = _data_already_sent(stage, mode)
    expected: type[SmtpError] = UnknownOutcome if unknown else ConnectionLost
    with pytest.raises(expected) as caught:
        send()
    assert caught.value.stage is _client_stage(stage, mode)
    if unknown:
        assert caught.value.permanent and isinstance(caught.value.__cause__, ConnectionLost)
    if stage == "data_end":
        # the server got the message and may have delivered it: never "transient, just resend"
        assert caught.value.permanent
        assert len(server.messages) == 1
        assert isinstance(caught.value.__cause__, ConnectionLost)
    elif not unknown:
        assert caught.value.transient
    # a drop before MAIL's reply is the connection's fault: one free reconnect (the data not yet sent)
    assert server.connection_count == (2 if stage == "mail" and not unknown else 1)
    assert client.state.value == "closed" and not client.data_in_flight


# --- hangs and deadlines ----------------------------------------------------------------------------

DEADLINE = 0.25


@pytest.mark.parametrize(("stage", "mode"), CASES, ids=CASE_IDS)
def test_hang_at_each_stage_fires_that_stages_deadline(
    scripted_server: Scripted, stage: str, mode: str
) -> None:
    server = scripted_server(ehlo_keywords=KEYWORDS[mode], faults={stage: Fault("hang")})
    # Every other stage waits 5 s: a test taking that long used the wrong deadline.
    client, send = _send(server, **{f"timeout_{stage}": DEADLINE})
    started = time.monotonic()
    unknown = _data_already_sent(stage, mode)
    expected: type[SmtpError] = UnknownOutcome if unknown else StageTimeout
    with pytest.raises(expected) as caught:
        send()
    elapsed = time.monotonic() - started
    assert DEADLINE * 0.9 <= elapsed < DEADLINE + 1.5, elapsed
    assert caught.value.stage is _client_stage(stage, mode)
    assert f"{_client_stage(stage, mode).value} deadline" in str(caught.value)
    if unknown:
        assert isinstance(caught.value.__cause__, StageTimeout) and caught.value.permanent
    else:
        assert isinstance(caught.value, TimeoutError) and caught.value.transient
    if stage == "data_end":
        assert len(server.messages) == 1 and server.messages[0].final_reply is None
    assert client.state.value == "closed"
    assert server.wait_closed(1, timeout=5).ended in ("eof", "stopped")


def test_the_default_data_end_deadline_is_ten_minutes() -> None:
    client = SmtpClient.from_url("smtp://127.0.0.1:2525")
    timeouts = client.config.timeouts
    assert (timeouts.greeting, timeouts.mail, timeouts.rcpt, timeouts.data, timeouts.data_end) == (
        300,
        300,
        300,
        120,
        600,
    )
    assert timeouts.data_block == 180


def test_a_reply_dribbling_in_cannot_outlive_the_stage_deadline(scripted_server: Scripted) -> None:
    # Half a greeting, then nothing: the deadline bounds the whole reply, not each recv().
    server = scripted_server(raw_script=[b"220-part one\r\n", b"220-part two\r\n"], after_raw_script="hang")
    _client, send = _send(server, timeout_greeting=DEADLINE)
    started = time.monotonic()
    with pytest.raises(StageTimeout) as caught:
        send()
    assert time.monotonic() - started < DEADLINE + 1.5
    assert caught.value.stage is Stage.GREETING


# --- reply framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", KEYWORDS)
def test_replies_split_one_byte_at_a_time(scripted_server: Scripted, mode: str) -> None:
    faults = {stage: Fault("split") for stage in (*_stages_for(mode), "quit")}
    server = scripted_server(
        ehlo_keywords=[*KEYWORDS[mode], "ENHANCEDSTATUSCODES", "SMTPUTF8"], faults=faults
    )
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", ["b@y.org", "c@y.org"], b"split\r\n")
        assert client.extensions.smtputf8 and client.extensions.size_limit == 100000
    assert result.accepted == ("b@y.org", "c@y.org")
    assert result.reply is not None and result.reply.code == 250 and result.reply.enhanced == "2.0.0"
    record = server.wait_closed(1)
    assert record.ended == "quit"
    assert record.writes > 100  # really one byte per segment
    assert [m.data for m in server.messages] == [b"split\r\n"]


def test_several_replies_in_one_packet(scripted_server: Scripted) -> None:
    # The scripted server answers a pipelined group with one write: 1 MAIL + 5 RCPT + DATA replies.
    server = scripted_server(ehlo_keywords=PIPELINED, per_recipient={"r3@y.org": b"550 5.1.1 nope\r\n"})
    recipients = [f"r{i}@y.org" for i in range(5)]
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", recipients, b"x\r\n")
    assert result.accepted == ("r0@y.org", "r1@y.org", "r2@y.org", "r4@y.org")
    assert result.permanent == ("r3@y.org",)
    record = server.wait_closed(1)
    replies = [e for e in result.transcript if e["dir"] == "S"]
    assert len(replies) == 1 + 1 + 1 + 5 + 1 + 1  # greeting, EHLO, MAIL, 5 RCPT, DATA, final
    assert record.writes == 1 + 1 + 1 + 1 + 1  # greeting, EHLO, the group, final, QUIT


def test_two_replies_in_the_first_packet_are_read_in_order(scripted_server: Scripted) -> None:
    # Greeting and an unasked refusal in one packet: replies are consumed in order, none is lost or
    # skipped, so the refusal answers EHLO and the dialogue stops instead of drifting out of step.
    server = scripted_server(
        raw_script=[b"220 hi\r\n554 5.7.0 go away\r\n"], after_raw_script="dialogue", ehlo_keywords=PIPELINED
    )
    _client, send = _send(server)
    with pytest.raises(SmtpError) as caught:
        send()
    assert caught.value.reply is not None and caught.value.reply.code == 554
    assert caught.value.stage is Stage.EHLO
    assert server.messages == []


def test_multiline_greeting_and_ehlo(scripted_server: Scripted) -> None:
    server = scripted_server(
        greeting=b"220-scripted.test first\r\n220-second\r\n220 third\r\n",
        ehlo_keywords=["PIPELINING", "SIZE 100000", "AUTH PLAIN LOGIN", "ENHANCEDSTATUSCODES", "8BITMIME"],
    )
    with SmtpClient.from_url(url(server.port)) as client:
        assert client.send("a@x.org", ["b@y.org"], b"x\r\n").accepted == ("b@y.org",)
        assert client.extensions.auth_mechanisms == frozenset({"PLAIN", "LOGIN"})
        greeting = client.last_transcript[1]
    assert greeting["code"] == 220 and greeting["text"] == "scripted.test first\nsecond\nthird"


GARBAGE = [
    ("not-a-code", [b"HELLO there\r\n"]),
    ("code-out-of-range", [b"999 what\r\n"]),
    ("binary", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n"]),
    ("bad-separator", [b"220_hi\r\n"]),
    ("mixed-codes", [b"220-hi\r\n250 there\r\n"]),
    ("overlong-no-newline", [b"220 " + b"x" * 70000]),
    ("overlong-line", [b"220 " + b"y" * 10000 + b"\r\n"]),
    ("too-many-lines", [b"220-x\r\n" * 2000]),
]


@pytest.mark.parametrize("script", [g[1] for g in GARBAGE], ids=[g[0] for g in GARBAGE])
def test_garbage_greeting_is_a_protocol_error_without_waiting(
    scripted_server: Scripted, script: list[bytes]
) -> None:
    server = scripted_server(raw_script=script, after_raw_script="hang")
    client, send = _send(server, timeout=5)
    started = time.monotonic()
    with pytest.raises(ProtocolError) as caught:
        send()
    assert time.monotonic() - started < 2.0  # not the 5 s deadline
    assert caught.value.stage is Stage.GREETING and caught.value.route_level
    assert client.state.value == "closed"


@pytest.mark.parametrize("stage", ["ehlo", "mail", "rcpt", "data"])
def test_garbage_reply_mid_dialogue_is_a_protocol_error(scripted_server: Scripted, stage: str) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED, faults={stage: Fault("reply", b"this is not smtp\r\n")})
    _client, send = _send(server, pipelining=False)
    started = time.monotonic()
    with pytest.raises(ProtocolError) as caught:
        send()
    assert time.monotonic() - started < 2.0
    assert caught.value.stage is Stage(stage)
    assert "this is not smtp" in str(caught.value)
    assert server.messages == []


def test_garbage_after_the_final_reply_is_an_unknown_outcome_not_a_hang(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED, faults={"data_end": Fault("reply", b"this is not smtp\r\n")}
    )
    _client, send = _send(server)
    with pytest.raises(UnknownOutcome) as caught:
        send()
    assert caught.value.stage is Stage.DATA_END
    assert isinstance(caught.value.__cause__, ProtocolError)


def test_final_250_followed_by_garbage_in_the_same_packet_counts_as_accepted(
    scripted_server: Scripted,
) -> None:
    server = scripted_server(
        ehlo_keywords=PIPELINED,
        faults={"data_end": Fault("reply", b"250 2.0.0 queued\r\nthis is not smtp\r\n")},
    )
    client = SmtpClient.from_url(url(server.port))
    result = client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert result.accepted == ("b@y.org",)
    assert result.reply is not None and result.reply.code == 250
    client.abort()


# --- greeting and EHLO ------------------------------------------------------------------------------


@pytest.mark.parametrize("code", [554, 421, 450])
def test_greeting_other_than_220_is_an_error_with_the_reply(scripted_server: Scripted, code: int) -> None:
    server = scripted_server(greeting=b"%d 5.3.2 no service here\r\n" % code)
    _client, send = _send(server)
    with pytest.raises(ReplyError) as caught:
        send()
    assert caught.value.stage is Stage.GREETING
    assert caught.value.reply is not None and caught.value.reply.code == code
    assert caught.value.transient is (code < 500)
    assert server.commands(1) == []


@pytest.mark.parametrize("code", [500, 502])
def test_ehlo_refused_falls_back_to_helo(scripted_server: Scripted, code: int) -> None:
    server = scripted_server(faults={"ehlo": Fault("reply", b"%d 5.5.2 what is EHLO\r\n" % code)})
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", ["b@y.org", "c@y.org"], b"x\r\n")
        assert not client.extensions.pipelining
    assert result.accepted == ("b@y.org", "c@y.org")
    assert result.round_trips == 5  # no extensions after HELO: lock-step
    server.wait_closed(1)
    assert server.commands(1) == ["EHLO", "HELO", "MAIL", "RCPT", "RCPT", "DATA", "QUIT"]
    assert server.lines(1)[1] == b"HELO client.test\r\n"
    assert server.lines(1)[2] == b"MAIL FROM:<a@x.org>\r\n"  # no SIZE/BODY without EHLO


def test_ehlo_refused_otherwise_is_an_error(scripted_server: Scripted) -> None:
    server = scripted_server(faults={"ehlo": Fault("reply", b"554 5.7.1 not you\r\n")})
    _client, send = _send(server)
    with pytest.raises(ReplyError) as caught:
        send()
    assert caught.value.stage is Stage.EHLO and caught.value.permanent
    assert "HELO" not in server.commands(1)


def test_helo_fallback_with_8bit_body_is_refused_before_mail(scripted_server: Scripted) -> None:
    server = scripted_server(faults={"ehlo": Fault("reply", b"502 5.5.2 no\r\n")})
    client = SmtpClient.from_url(url(server.port))
    with pytest.raises(SmtpError) as caught:
        client.send("a@x.org", ["b@y.org"], b"caf\xe9\r\n")
    assert caught.value.stage is Stage.MAIL
    assert "MAIL" not in server.commands(1)
    client.close()


@pytest.mark.parametrize(
    ("fault", "option", "stage"),
    [
        ({"starttls": Fault("hang")}, "timeout_starttls", Stage.STARTTLS),
        ({"tls_handshake": Fault("hang")}, "timeout_starttls", Stage.TLS_HANDSHAKE),
        ({"auth": Fault("hang")}, "timeout_auth", Stage.AUTH),
    ],
    ids=["starttls", "tls_handshake", "auth"],
)
def test_hang_in_tls_and_auth_fires_their_deadlines(
    scripted_server: Scripted,
    tls_server_context: ssl.SSLContext,
    tls_ca_file: Path,
    fault: dict[str, Fault],
    option: str,
    stage: Stage,
) -> None:
    server = scripted_server(
        starttls_context=tls_server_context, ehlo_keywords=["STARTTLS", "AUTH PLAIN"], faults=fault
    )
    route = url(
        server.port, scheme="smtp+starttls", user="u", password="p", ca_file=tls_ca_file, **{option: DEADLINE}
    )
    client = SmtpClient.from_url(route)
    started = time.monotonic()
    with pytest.raises(StageTimeout) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert DEADLINE * 0.9 <= time.monotonic() - started < DEADLINE + 1.5
    assert caught.value.stage is stage
    assert "MAIL" not in server.commands(1)


def test_421_during_auth_is_service_closing(scripted_server: Scripted) -> None:
    server = scripted_server(
        ehlo_keywords=["AUTH LOGIN"], faults={"auth": Fault("reply", b"421 4.7.0 too many\r\n")}
    )
    route = url(server.port, user="u", password="p", allow_plaintext_auth=True)
    with pytest.raises(ServiceClosing) as caught:
        SmtpClient.from_url(route).send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.AUTH and caught.value.transient


def test_starttls_reply_with_injected_plaintext_is_discarded(
    scripted_server: Scripted, tls_server_context: ssl.SSLContext, tls_ca_file: Path
) -> None:
    # CVE-2011-0411 turned around: plaintext behind the 220 must not be read as the post-TLS EHLO answer.
    server = scripted_server(
        starttls_context=tls_server_context,
        ehlo_keywords=["STARTTLS", "PIPELINING", "SIZE 100000"],
        faults={"starttls": Fault("reply", b"220 2.0.0 go ahead\r\n250 injected-before-tls\r\n")},
    )
    route = url(server.port, scheme="smtp+starttls", ca_file=tls_ca_file)
    with SmtpClient.from_url(route) as client:
        result = client.send("a@x.org", ["b@y.org"], b"x\r\n")
        assert client.extensions.pipelining and client.extensions.size_limit == 100000
    assert result.accepted == ("b@y.org",)
    texts = [str(e.get("text")) for e in result.transcript if e["dir"] == "S"]
    assert not any("injected" in text for text in texts)
    assert server.commands(1) == ["EHLO", "STARTTLS", "EHLO", "MAIL", "RCPT", "DATA", "QUIT"]


def test_connection_refused_is_connect_error() -> None:
    port = free_port()
    client = SmtpClient.from_url(url(port))
    with pytest.raises(ConnectError) as caught:
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert caught.value.stage is Stage.CONNECT and caught.value.transient and caught.value.route_level
    assert isinstance(caught.value, ConnectionError)
    assert client.connections_opened == 0


def test_client_recovers_on_the_next_send_after_a_timeout(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=PIPELINED, faults={"rcpt": Fault("hang")}, faults_on_connection=1)
    with SmtpClient.from_url(url(server.port, timeout_rcpt=DEADLINE)) as client:
        with pytest.raises(StageTimeout):
            client.send("a@x.org", ["b@y.org"], b"one\r\n")
        assert client.state.value == "closed"
        assert client.send("a@x.org", ["b@y.org"], b"two\r\n").accepted == ("b@y.org",)
    assert server.connection_count == 2
    assert [m.data for m in server.messages] == [b"two\r\n"]


# --- failures while the message data is still being written -----------------------------------------
# The final dot (or the end of the BDAT LAST chunk) never left: the server cannot have accepted the
# message, so the outcome is known (not delivered) and transient, not UnknownOutcome.

BIG = (b"y" * 78 + b"\r\n") * 250_000  # 20 MB: more than loopback socket buffers hold


@pytest.mark.parametrize("mode", ["pipelined", "chunking"])
def test_drop_while_sending_data_is_connection_lost_not_unknown(scripted_server: Scripted, mode: str) -> None:
    keywords = ["PIPELINING", "SIZE 100000000"] + (["CHUNKING"] if mode == "chunking" else [])
    server = scripted_server(ehlo_keywords=keywords, faults={"data_block": Fault("drop")})
    client = SmtpClient.from_url(url(server.port))
    with pytest.raises(SmtpError) as caught:
        client.send("a@x.org", ["b@y.org"], BIG)
    assert server.messages == []
    assert caught.value.stage is Stage.DATA_BLOCK
    assert isinstance(caught.value, ConnectionLost) and caught.value.transient


@pytest.mark.parametrize(
    "keywords", [("SIZE 200000000",), ("PIPELINING", "CHUNKING", "SIZE 200000000")], ids=["data", "bdat"]
)
def test_data_block_deadline_fires_when_the_server_stops_reading(keywords: tuple[str, ...]) -> None:
    with StallingServer(keywords) as server:
        client = SmtpClient.from_url(url(server.port, timeout_data_block=DEADLINE))
        started = time.monotonic()
        with pytest.raises(SmtpError) as caught:
            client.send("a@x.org", ["b@y.org"], BIG)
        elapsed = time.monotonic() - started
        assert server.stalled.is_set()
    assert elapsed < DEADLINE + 3, elapsed  # the 5 s data_end deadline was not the one that fired
    assert caught.value.stage is Stage.DATA_BLOCK
    assert isinstance(caught.value, StageTimeout) and caught.value.transient
