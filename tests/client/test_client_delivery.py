"""Delivery on the wire: exact bytes, MAIL parameters, per-recipient outcomes, pipelining and CHUNKING.

Issue 2, client items 5 (transaction) and 6 (fewer round trips) and 10 (arguments refused before sending);
tests: "aiosmtpd ... with PIPELINING: the bytes the server stores equal the input after CRLF
normalisation" and "a scripted CHUNKING server: BDAT path byte-exact, one round trip per message".
Expected bytes are written out by hand, never computed with the client's own encoder.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from client_support import url
from servers import RecordingSmtpServer, Rule, ScriptedSmtpServer

from dispatcher.errors import ConfigurationError, InvalidCommandArgument, PolicyError
from dispatcher.smtp import RecipientStatus, SmtpClient, Stage

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]

# (id, input, what the server must store)
BODIES = [
    ("crlf", b"Subject: a\r\n\r\nhello\r\n", b"Subject: a\r\n\r\nhello\r\n"),
    ("lone-dot", b"a\r\n.\r\nb\r\n", b"a\r\n.\r\nb\r\n"),
    ("double-dot", b"a\r\n..\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
    ("dot-x", b".x\r\n.\r\n..\r\n.x\r\n", b".x\r\n.\r\n..\r\n.x\r\n"),
    ("bare-lf", b"a\nb\n\nc\n", b"a\r\nb\r\n\r\nc\r\n"),
    ("bare-cr", b"a\rb\r\rc\r", b"a\r\nb\r\n\r\nc\r\n"),
    ("mixed-endings", b"a\r\r\nb\n\rc", b"a\r\n\r\nb\r\n\r\nc\r\n"),
    ("no-final-newline", b"a\r\nlast", b"a\r\nlast\r\n"),
    ("lone-dot-bare-lf", b"a\n.\nb", b"a\r\n.\r\nb\r\n"),
    ("lone-dot-bare-cr", b"a\r.\rb", b"a\r\n.\r\nb\r\n"),
    ("only-dot", b".", b".\r\n"),
    ("smuggling", b"x\n.\r\nMAIL FROM:<evil@x.org>\r\n", b"x\r\n.\r\nMAIL FROM:<evil@x.org>\r\n"),
    ("utf8", "Subject: Grüße\r\n\r\n你好 ✓\r\n".encode(), "Subject: Grüße\r\n\r\n你好 ✓\r\n".encode()),
    ("8bit-latin1", b"caf\xe9\r\n\xff\xfe\x80\n", b"caf\xe9\r\n\xff\xfe\x80\r\n"),
]


def _mail_lines(sink: RecordingSmtpServer) -> list[str]:
    return [line for line in sink.command_lines() if line.upper().startswith("MAIL ")]


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "lockstep"])
@pytest.mark.parametrize(("body", "expected"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_stored_bytes_equal_normalised_input(
    smtp_server: Sink, pipelining: bool, body: bytes, expected: bytes
) -> None:
    sink = smtp_server(pipelining=pipelining)
    with SmtpClient.from_url(url(sink.port)) as client:
        result = client.send("from@x.org", ["to@y.org"], body)
        assert client.extensions.pipelining is pipelining
    assert result.accepted == ("to@y.org",)
    assert result.reply is not None and result.reply.code == 250
    message = sink.wait_for_messages(1, 5)[0]
    assert message.data == expected
    assert (message.mail_from, message.rcpt_tos) == ("from@x.org", ["to@y.org"])
    # A lone "." in the body never ended the message early: exactly one MAIL reached the server.
    (mail,) = _mail_lines(sink)
    eight_bit = any(byte > 127 for byte in body)
    assert ("BODY=8BITMIME" in mail) is eight_bit
    assert f"SIZE={len(expected)}" in mail


def test_empty_body_is_sent_as_an_empty_message(smtp_server: Sink) -> None:
    sink = smtp_server()
    with SmtpClient.from_url(url(sink.port)) as client:
        assert client.send("", ["to@y.org"], b"").accepted == ("to@y.org",)
    message = sink.wait_for_messages(1, 5)[0]
    assert (message.mail_from, message.data) == ("<>", b"")  # aiosmtpd records the null path as "<>"
    assert _mail_lines(sink) == ["MAIL FROM:<> SIZE=0"]


def test_pipelined_send_puts_mail_rcpt_data_in_one_write(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING", "8BITMIME", "SIZE 100000"])
    recipients = ["a@y.org", "b@y.org", "c@y.org"]
    with SmtpClient.from_url(url(server.port)) as client:
        results = [client.send("from@x.org", recipients, f"m{i}\r\n".encode()) for i in range(3)]
    assert all(r.accepted == tuple(recipients) for r in results)
    # Client's own count and the server's agree: group (MAIL, 3x RCPT, DATA) then the data = 2 round trips.
    assert [r.round_trips for r in results] == [2, 2, 2]
    server.wait_closed(1)
    assert server.round_trips == 6
    assert server.commands(1) == ["EHLO", *(["MAIL", "RCPT", "RCPT", "RCPT", "DATA"] * 3), "QUIT"]
    assert [m.data for m in server.messages] == [b"m0\r\n", b"m1\r\n", b"m2\r\n"]
    assert all(m.via == "DATA" for m in server.messages)


def test_lockstep_without_pipelining_waits_for_every_reply(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["8BITMIME"])
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("from@x.org", ["a@y.org", "b@y.org"], b"hi\r\n")
    assert result.accepted == ("a@y.org", "b@y.org")
    assert result.round_trips == 5  # MAIL, RCPT, RCPT, DATA, data
    server.wait_closed(1)
    assert server.round_trips == 5


def test_pipelining_off_in_url_is_lockstep_even_when_offered(scripted_server: Scripted) -> None:
    server = scripted_server()
    with SmtpClient.from_url(url(server.port, pipelining=False)) as client:
        result = client.send("from@x.org", ["a@y.org"], b"hi\r\n")
    assert result.round_trips == 4  # MAIL, RCPT, DATA, data
    server.wait_closed(1)
    assert server.round_trips == 4


CHUNKING_KEYWORDS = ["PIPELINING", "CHUNKING", "8BITMIME", "SIZE 100000"]


@pytest.mark.parametrize(("body", "expected"), [b[1:] for b in BODIES], ids=[b[0] for b in BODIES])
def test_bdat_path_is_byte_exact_in_one_round_trip(
    scripted_server: Scripted, body: bytes, expected: bytes
) -> None:
    server = scripted_server(ehlo_keywords=CHUNKING_KEYWORDS)
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("from@x.org", ["to@y.org"], body)
    assert result.accepted == ("to@y.org",)
    assert result.round_trips == 1
    message = server.wait_for_messages(1)[0]
    assert message.via == "BDAT"
    assert message.chunks == [expected]  # BDAT: no dot-stuffing, no terminator, CRLF only
    assert message.raw == expected
    server.wait_closed(1)
    assert server.round_trips == 1
    body_param = b" BODY=8BITMIME" if any(byte > 127 for byte in body) else b""
    assert server.lines(1)[1:] == [
        b"MAIL FROM:<from@x.org> SIZE=%d%s\r\n" % (len(expected), body_param),
        b"RCPT TO:<to@y.org>\r\n",
        b"BDAT %d LAST\r\n" % len(expected),
        b"QUIT\r\n",
    ]


def test_chunking_costs_one_round_trip_per_message(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=CHUNKING_KEYWORDS)
    with SmtpClient.from_url(url(server.port)) as client:
        results = [client.send("from@x.org", ["a@y.org", "b@y.org"], b"n%d\r\n" % i) for i in range(5)]
    assert [r.round_trips for r in results] == [1] * 5
    server.wait_closed(1)
    assert server.connection_count == 1
    assert server.round_trips == 5
    assert [m.chunks for m in server.messages] == [[b"n%d\r\n" % i] for i in range(5)]


def test_chunking_off_in_url_uses_data(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=CHUNKING_KEYWORDS)
    with SmtpClient.from_url(url(server.port, chunking=False)) as client:
        assert client.send("from@x.org", ["a@y.org"], b"x\r\n").round_trips == 2
    assert server.wait_for_messages(1)[0].via == "DATA"


MIXED = {
    "hard@y.org": b"550 5.1.1 no such user\r\n",
    "soft@y.org": b"450 4.2.1 mailbox busy\r\n",
}
MIXED_RECIPIENTS = ["ok1@y.org", "hard@y.org", "soft@y.org", "ok2@y.org"]


def _summary(client: SmtpClient, recipients: list[str]) -> list[tuple[str, str, str, int | None, str | None]]:
    result = client.send("from@x.org", recipients, b"Subject: same\r\n\r\nbody\r\n")
    return [
        (
            o.recipient,
            o.status.value,
            # the reply after the data is "data_end" for DATA and "bdat" for BDAT LAST: same meaning
            "final" if o.stage in (Stage.DATA_END, Stage.BDAT) else o.stage.value,
            o.reply.code if o.reply else None,
            o.reply.enhanced if o.reply else None,
        )
        for o in result.outcomes
    ]


@pytest.mark.parametrize(
    "recipients",
    [MIXED_RECIPIENTS, ["hard@y.org", "soft@y.org"], ["ok1@y.org"]],
    ids=["mixed", "none-accepted", "one"],
)
def test_outcomes_identical_lockstep_pipelined_and_chunking(
    scripted_server: Scripted, recipients: list[str]
) -> None:
    modes = {
        "lockstep": ["8BITMIME", "SIZE 100000"],
        "pipelined": ["PIPELINING", "8BITMIME", "SIZE 100000"],
        "chunking": CHUNKING_KEYWORDS,
    }
    seen = {}
    for mode, keywords in modes.items():
        server = scripted_server(ehlo_keywords=keywords, per_recipient=MIXED)
        with SmtpClient.from_url(url(server.port)) as client:
            seen[mode] = _summary(client, recipients)
        accepted = [r for r in recipients if r.startswith("ok")]
        delivered = [m.rcpt_tos for m in server.messages]
        assert delivered == ([accepted] if accepted else []), mode
    assert seen["lockstep"] == seen["pipelined"] == seen["chunking"]
    statuses = {r: s for r, s, *_ in seen["lockstep"]}
    expected = {
        "ok1@y.org": "accepted",
        "ok2@y.org": "accepted",
        "hard@y.org": "permanent",
        "soft@y.org": "transient",
    }
    assert statuses == {r: expected[r] for r in recipients}


def test_deciding_reply_identical_across_modes_when_no_recipient_accepted(scripted_server: Scripted) -> None:
    replies = {}
    for mode, keywords in {
        "lockstep": ["8BITMIME"],
        "pipelined": ["PIPELINING"],
        "chunking": CHUNKING_KEYWORDS,
    }.items():
        server = scripted_server(ehlo_keywords=keywords, per_recipient=MIXED)
        with SmtpClient.from_url(url(server.port)) as client:
            result = client.send("from@x.org", ["hard@y.org", "soft@y.org"], b"x\r\n")
        assert result.reply is not None
        replies[mode] = (result.reply.code, result.reply.text)
    assert replies["lockstep"] == (450, "4.2.1 mailbox busy")  # the last refusal, as documented
    assert replies["pipelined"] == replies["lockstep"]
    assert replies["chunking"] == replies["lockstep"]


def test_partial_rcpt_acceptance_delivers_to_accepted_only(smtp_server: Sink) -> None:
    sink = smtp_server(
        rules={"gone@y.org": Rule(550, "5.1.1 no such user"), "busy@y.org": Rule(451, "4.3.0 try later")}
    )
    with SmtpClient.from_url(url(sink.port)) as client:
        result = client.send("from@x.org", ["a@y.org", "gone@y.org", "busy@y.org", "b@y.org"], b"hi\r\n")
    assert result.accepted == ("a@y.org", "b@y.org")
    assert result.permanent == ("gone@y.org",)
    assert result.transient == ("busy@y.org",)
    by_recipient = {o.recipient: o for o in result.outcomes}
    gone = by_recipient["gone@y.org"]
    assert (gone.stage, gone.reply and gone.reply.code, gone.reply and gone.reply.enhanced) == (
        Stage.RCPT,
        550,
        "5.1.1",
    )
    busy = by_recipient["busy@y.org"]
    assert (busy.status, busy.stage, busy.reply and busy.reply.code) == (
        RecipientStatus.TRANSIENT,
        Stage.RCPT,
        451,
    )
    ok = by_recipient["a@y.org"]
    assert (ok.stage, ok.reply and ok.reply.code) == (Stage.DATA_END, 250)
    message = sink.wait_for_messages(1, 5)[0]
    assert message.rcpt_tos == ["a@y.org", "b@y.org"]


@pytest.mark.parametrize("pipelining", [False, True], ids=["lockstep", "pipelined"])
def test_no_recipient_accepted_means_rset_and_no_message(smtp_server: Sink, pipelining: bool) -> None:
    sink = smtp_server(
        pipelining=pipelining,
        rules={"a@y.org": Rule(550, "5.1.1 no"), "b@y.org": Rule(450, "4.2.0 later")},
    )
    with SmtpClient.from_url(url(sink.port)) as client:
        result = client.send("from@x.org", ["a@y.org", "b@y.org"], b"hi\r\n")
        assert result.accepted == ()
        assert result.permanent == ("a@y.org",)
        assert result.transient == ("b@y.org",)
        # the connection stays usable
        assert client.send("from@x.org", ["c@y.org"], b"next\r\n").accepted == ("c@y.org",)
        assert client.connections_opened == 1
    verbs = [line.split(" ", 1)[0].upper() for line in sink.command_lines()]
    first = verbs[: verbs.index("RSET") + 1]
    if pipelining:
        # RFC 2920: DATA travels in the group; the server refuses it and nothing is stored.
        assert first == ["EHLO", "MAIL", "RCPT", "RCPT", "DATA", "RSET"]
    else:
        assert first == ["EHLO", "MAIL", "RCPT", "RCPT", "RSET"]
    assert [m.data for m in sink.wait_for_messages(1, 5)] == [b"next\r\n"]


def test_size_too_big_is_refused_before_mail(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING", "SIZE 100"])
    with SmtpClient.from_url(url(server.port)) as client:
        with pytest.raises(PolicyError) as caught:
            client.send("from@x.org", ["to@y.org"], b"x" * 99 + b"\n")  # 101 bytes after CRLF
        assert caught.value.permanent and caught.value.stage is Stage.MAIL
        assert "SIZE" in str(caught.value)
        # exactly at the limit goes through
        assert client.send("from@x.org", ["to@y.org"], b"x" * 98 + b"\n").accepted == ("to@y.org",)
    server.wait_closed(1)
    assert server.commands(1) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert server.lines(1)[1] == b"MAIL FROM:<from@x.org> SIZE=100\r\n"


def test_8bit_body_without_8bitmime_is_refused_before_mail(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING"])
    with SmtpClient.from_url(url(server.port)) as client:
        with pytest.raises(PolicyError) as caught:
            client.send("from@x.org", ["to@y.org"], "Grüße\r\n".encode())
        assert caught.value.stage is Stage.MAIL and "8BITMIME" in str(caught.value)
        client.send("from@x.org", ["to@y.org"], b"plain ascii\r\n")
    server.wait_closed(1)
    assert server.commands(1) == ["EHLO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert server.lines(1)[1] == b"MAIL FROM:<from@x.org>\r\n"  # no SIZE offered, no BODY for 7-bit


def test_smtputf8_addresses_when_advertised(smtp_server: Sink) -> None:
    sink = smtp_server(smtputf8=True)
    body = "Subject: ünïcode\r\n\r\nhi\r\n".encode()
    with SmtpClient.from_url(url(sink.port)) as client:
        result = client.send("jörg@exämple.org", ["用户@例子.广告", "plain@y.org"], body)
    assert result.accepted == ("用户@例子.广告", "plain@y.org")
    message = sink.wait_for_messages(1, 5)[0]
    assert (message.mail_from, message.rcpt_tos, message.data) == (
        "jörg@exämple.org",
        ["用户@例子.广告", "plain@y.org"],
        body,
    )
    (mail,) = _mail_lines(sink)
    assert mail.startswith("MAIL FROM:<jörg@exämple.org>")
    assert "SMTPUTF8" in mail.split() and "BODY=8BITMIME" in mail.split()


def test_ascii_addresses_do_not_ask_for_smtputf8(smtp_server: Sink) -> None:
    sink = smtp_server(smtputf8=True)
    with SmtpClient.from_url(url(sink.port)) as client:
        client.send("a@x.org", ["b@y.org"], b"hi\r\n")
    assert "SMTPUTF8" not in _mail_lines(sink)[0]


@pytest.mark.parametrize(
    ("sender", "recipient"),
    [("jörg@x.org", "b@y.org"), ("a@x.org", "用户@例子.广告")],
    ids=["sender", "rcpt"],
)
def test_smtputf8_address_without_the_extension_is_refused_before_mail(
    smtp_server: Sink, sender: str, recipient: str
) -> None:
    sink = smtp_server(smtputf8=False)
    with SmtpClient.from_url(url(sink.port)) as client, pytest.raises(PolicyError) as caught:
        client.send(sender, [recipient], b"hi\r\n")
    assert caught.value.permanent and caught.value.stage is Stage.MAIL
    assert "SMTPUTF8" in str(caught.value)
    verbs = [line.split(" ", 1)[0].upper() for line in sink.command_lines()]
    assert "MAIL" not in verbs and "RCPT" not in verbs
    assert sink.messages == []


@pytest.mark.parametrize(
    ("sender", "recipients"),
    [
        ("a@x.org\r\nRCPT TO:<evil@x.org>", ["b@y.org"]),
        ("a@x.org", ["b@y.org\nDATA"]),
        ("a@x.org", ["b@y.org", "c\x00@y.org"]),
        ("a@x.org", ["<b@y.org>"]),
        ("a@x.org", ["b@y.org\r"]),
        ("a@x.org", []),
    ],
    ids=["crlf-sender", "lf-rcpt", "nul-rcpt", "angle-rcpt", "cr-rcpt", "no-recipients"],
)
def test_bad_addresses_are_refused_before_connecting(
    smtp_server: Sink, sender: str, recipients: list[str]
) -> None:
    sink = smtp_server()
    client = SmtpClient.from_url(url(sink.port))
    with pytest.raises((InvalidCommandArgument, PolicyError)) as caught:
        client.send(sender, recipients, b"hi\r\n")
    assert caught.value.permanent
    assert client.connections_opened == 0
    assert sink.connections == 0 and sink.commands == []
    client.close()


def test_large_message_in_many_blocks_is_byte_exact(smtp_server: Sink) -> None:
    # ~1.3 MB: many 64 KiB data blocks, with dot lines landing on and around block boundaries.
    lines = [(b"." if i % 7 == 0 else b"") + b"line %06d " % i + b"x" * (i % 90) for i in range(20000)]
    body = b"\n".join(lines)
    sink = smtp_server()
    with SmtpClient.from_url(url(sink.port)) as client:
        assert client.send("a@x.org", ["b@y.org"], body).accepted == ("b@y.org",)
    assert sink.wait_for_messages(1, 10)[0].data == b"\r\n".join(lines) + b"\r\n"


def test_large_message_over_bdat_is_byte_exact(scripted_server: Scripted) -> None:
    lines = [b".%d" % i for i in range(100000)]
    server = scripted_server(ehlo_keywords=[*CHUNKING_KEYWORDS[:-1], "SIZE 10000000"])
    with SmtpClient.from_url(url(server.port)) as client:
        result = client.send("a@x.org", ["b@y.org"], b"\r".join(lines))
    assert result.round_trips == 1
    assert server.wait_for_messages(1)[0].data == b"\r\n".join(lines) + b"\r\n"


def test_size_without_a_limit_still_declares_the_size(scripted_server: Scripted) -> None:
    server = scripted_server(ehlo_keywords=["PIPELINING", "SIZE"])
    with SmtpClient.from_url(url(server.port)) as client:
        client.send("a@x.org", ["b@y.org"], b"x" * 5000)
    assert server.lines(1)[1] == b"MAIL FROM:<a@x.org> SIZE=5002\r\n"


@pytest.mark.parametrize("name", ["bad%0Aname", "bad%0D%0AMAIL", "bad%00", "two words"])
def test_ehlo_name_with_control_characters_is_refused_in_the_url(name: str) -> None:
    with pytest.raises(ConfigurationError):
        SmtpClient.from_url(f"smtp://127.0.0.1:25?ehlo_name={name}")
