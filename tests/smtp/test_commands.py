from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.errors import InvalidCommandArgument, ProtocolError
from dispatcher.smtp import commands

CONTROLS = [chr(c) for c in range(0x20)] + ["\x7f"]


def test_command_line() -> None:
    assert commands.command_line("NOOP") == b"NOOP\r\n"
    line = commands.command_line("MAIL", "FROM:<a@b.example>", "SIZE=10")
    assert line == b"MAIL FROM:<a@b.example> SIZE=10\r\n"
    utf8_line = commands.command_line("RCPT", "TO:<jürgen@exämple.de>")
    assert utf8_line == "RCPT TO:<jürgen@exämple.de>\r\n".encode()


def test_command_line_names_the_control_character() -> None:
    with pytest.raises(InvalidCommandArgument) as caught:
        commands.command_line("RCPT", "TO:<a@b>\r\nRCPT TO:<victim@example.com>")
    message = str(caught.value)
    assert "argument 'TO:<a@b>\\r\\nRCPT TO:<victim@exam" in message
    assert "U+000D" in message
    assert caught.value.transient is False
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("char", CONTROLS)
def test_command_line_refuses_every_control_character(char: str) -> None:
    with pytest.raises(InvalidCommandArgument, match=f"U\\+{ord(char):04X}"):
        commands.command_line("NOOP", f"x{char}y")
    with pytest.raises(InvalidCommandArgument, match=f"U\\+{ord(char):04X}"):
        commands.command_line(f"NO{char}OP")


@pytest.mark.parametrize("verb", ["", "MAIL FROM", "9X", "<x>"])
def test_command_line_refuses_bad_verbs(verb: str) -> None:
    with pytest.raises(InvalidCommandArgument, match="verb"):
        commands.command_line(verb)


def test_command_line_refuses_empty_argument() -> None:
    with pytest.raises(InvalidCommandArgument, match="empty argument"):
        commands.command_line("RCPT", "")


def test_command_line_length_limit() -> None:
    arg = "x" * (commands.MAX_COMMAND_LINE - len("NOOP \r\n"))
    assert len(commands.command_line("NOOP", arg)) == commands.MAX_COMMAND_LINE
    with pytest.raises(InvalidCommandArgument, match="longer than 2048"):
        commands.command_line("NOOP", arg + "x")
    with pytest.raises(InvalidCommandArgument, match="longer than 2048"):
        commands.command_line("NOOP", "é" * 1100)


def test_command_line_refuses_unencodable_text() -> None:
    with pytest.raises(InvalidCommandArgument, match="UTF-8"):
        commands.command_line("NOOP", "\udcff")


BUILDERS: list[tuple[str, Callable[[str], bytes]]] = [
    ("ehlo", commands.ehlo),
    ("helo", commands.helo),
    ("mail_from", commands.mail_from),
    ("rcpt_to", commands.rcpt_to),
    ("auth", commands.auth),
    ("auth_ir", lambda text: commands.auth("PLAIN", text)),
    ("mail_from_body", lambda text: commands.mail_from("a@b.example", body=text)),
    ("sasl_response", commands.sasl_response),
]


@pytest.mark.parametrize("char", CONTROLS)
@pytest.mark.parametrize(("name", "builder"), BUILDERS, ids=[name for name, _ in BUILDERS])
def test_every_builder_refuses_control_characters(
    name: str, builder: Callable[[str], bytes], char: str
) -> None:
    with pytest.raises(InvalidCommandArgument):
        builder(f"a{char}b.example")


def test_builders() -> None:
    assert commands.ehlo("client.example.com") == b"EHLO client.example.com\r\n"
    assert commands.helo("[192.0.2.1]") == b"HELO [192.0.2.1]\r\n"
    assert commands.mail_from("a@b.example") == b"MAIL FROM:<a@b.example>\r\n"
    assert commands.mail_from("") == b"MAIL FROM:<>\r\n"
    assert (
        commands.mail_from("a@b.example", size=1234, body="8bitmime", smtputf8=True)
        == b"MAIL FROM:<a@b.example> SIZE=1234 BODY=8BITMIME SMTPUTF8\r\n"
    )
    assert commands.mail_from("a@b.example", size=0) == b"MAIL FROM:<a@b.example> SIZE=0\r\n"
    assert commands.rcpt_to("Postmaster") == b"RCPT TO:<Postmaster>\r\n"
    assert commands.rcpt_to("user@example.com") == b"RCPT TO:<user@example.com>\r\n"
    assert commands.data() == b"DATA\r\n"
    assert commands.bdat(123) == b"BDAT 123 LAST\r\n"
    assert commands.bdat(0, last=False) == b"BDAT 0\r\n"
    assert commands.rset() == b"RSET\r\n"
    assert commands.noop() == b"NOOP\r\n"
    assert commands.quit() == b"QUIT\r\n"
    assert commands.starttls() == b"STARTTLS\r\n"
    assert commands.auth("LOGIN") == b"AUTH LOGIN\r\n"
    plain = commands.auth("PLAIN", "AHRpbQB0YW5zdGFhZnRhbnN0YWFm")
    assert plain == b"AUTH PLAIN AHRpbQB0YW5zdGFhZnRhbnN0YWFm\r\n"
    assert commands.auth("PLAIN", "") == b"AUTH PLAIN =\r\n"
    assert commands.sasl_response("") == b"\r\n"
    assert commands.sasl_response("dXNlcg==") == b"dXNlcg==\r\n"


def test_auth_lines_may_carry_long_tokens() -> None:
    token = "A" * 4000
    assert commands.auth("XOAUTH2", token) == f"AUTH XOAUTH2 {token}\r\n".encode()
    with pytest.raises(InvalidCommandArgument):
        commands.auth("XOAUTH2", "A" * commands.MAX_AUTH_LINE)


@pytest.mark.parametrize("mechanism", ["plain", "", "PL AIN", "X" * 21])
def test_auth_refuses_bad_mechanism_names(mechanism: str) -> None:
    with pytest.raises(InvalidCommandArgument, match="mechanism"):
        commands.auth(mechanism)


@pytest.mark.parametrize(
    "call",
    [
        lambda: commands.mail_from("a@b.example", size=-1),
        lambda: commands.mail_from("a@b.example", body="QUOTED"),
        lambda: commands.bdat(-1),
        lambda: commands.bdat(True),
    ],
)
def test_bad_parameters(call: Callable[[], bytes]) -> None:
    with pytest.raises(InvalidCommandArgument):
        call()


@pytest.mark.parametrize(
    ("address", "field", "problem"),
    [
        ("", "recipient", "empty"),
        ("a b@example.com", "recipient", "whitespace"),
        ("a\u00a0b@example.com", "recipient", "whitespace"),
        ("<a@example.com>", "sender", "'<' or '>'"),
        ("a@example.com>", "recipient", "'<' or '>'"),
        ("a@b\r\nDATA", "sender", "U\\+000D"),
        ("a\x00@b", "recipient", "U\\+0000"),
        ("a\x7f@b", "recipient", "U\\+007F"),
        ("x" * 250 + "@example.com", "recipient", "more than 254"),
    ],
)
def test_check_address_refuses(address: str, field: str, problem: str) -> None:
    with pytest.raises(InvalidCommandArgument, match=problem) as caught:
        commands.check_address(address, field)
    assert str(caught.value).startswith(field)


def test_check_address_accepts() -> None:
    assert commands.check_address("", "sender") == ""
    assert commands.check_address("jürgen@exämple.de", "recipient") == "jürgen@exämple.de"
    assert commands.check_address("\"quoted\"@example.com", "recipient") == "\"quoted\"@example.com"
    assert commands.check_address("x" * 242 + "@example.com", "recipient").endswith("@example.com")  # 254


def test_mail_and_rcpt_name_the_field() -> None:
    with pytest.raises(InvalidCommandArgument, match=r"^sender"):
        commands.mail_from("a b@c")
    with pytest.raises(InvalidCommandArgument, match=r"^recipient"):
        commands.rcpt_to("")


@pytest.mark.parametrize(
    "name",
    ["localhost", "mail.example.com", "host-1.example", "my_host.lan", "[127.0.0.1]", "[IPv6:::1]",
     "[IPv6:2001:db8::1]", "[ipv6:fe80::1]", "[x-tag:some-content]"],
)
def test_ehlo_names_accepted(name: str) -> None:
    assert commands.check_ehlo_name(name) == name
    assert commands.ehlo(name) == f"EHLO {name}\r\n".encode()


@pytest.mark.parametrize(
    "name",
    ["", "bad host", "host\tname", "-lead.example", "trail-.example", "a..b", ".example", "[127.0.0.256]",
     "[IPv6:not-an-ip]", "[::1]", "127.0.0.1]", "[127.0.0.1", "[a b]", "héllo.example", "x" * 256,
     "a" * 64 + ".example"],
)
def test_ehlo_names_refused(name: str) -> None:
    with pytest.raises(InvalidCommandArgument):
        commands.check_ehlo_name(name)


def test_is_ascii_and_has_8bit() -> None:
    assert commands.is_ascii("user@example.com")
    assert not commands.is_ascii("jürgen@example.com")
    assert not commands.has_8bit(b"plain\r\n")
    assert commands.has_8bit(b"caf\xc3\xa9\r\n")
    assert commands.has_8bit(b"\x80")


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        (b"", b""),
        (b"a", b"a\r\n"),
        (b"a\r\n", b"a\r\n"),
        (b"a\nb\rc\r\nd", b"a\r\nb\r\nc\r\nd\r\n"),
        (b"a\n\rb", b"a\r\n\r\nb\r\n"),
        (b"a\r\r\nb", b"a\r\n\r\nb\r\n"),
        (b"\n", b"\r\n"),
        (b"\r", b"\r\n"),
    ],
)
def test_normalize_line_endings(raw: bytes, normalized: bytes) -> None:
    assert commands.normalize_line_endings(raw) == normalized


@pytest.mark.parametrize(
    ("body", "wire"),
    [
        (b"", b".\r\n"),
        (b"Hello", b"Hello\r\n.\r\n"),
        (b".\r\n", b"..\r\n.\r\n"),
        (b"..\r\n", b"...\r\n.\r\n"),
        (b".x\r\n", b"..x\r\n.\r\n"),
        (b"a\r\n.\r\nb", b"a\r\n..\r\nb\r\n.\r\n"),
        (b"a\n.\nMAIL FROM:<x>\n", b"a\r\n..\r\nMAIL FROM:<x>\r\n.\r\n"),
        (b"a\r\n.\rRCPT", b"a\r\n..\r\nRCPT\r\n.\r\n"),
        (b"line\n.", b"line\r\n..\r\n.\r\n"),
        (b"x.y\r\n", b"x.y\r\n.\r\n"),
        ("Grüße\n".encode(), "Grüße\r\n.\r\n".encode()),
        (b"\xff\x80\n.\xfe", b"\xff\x80\r\n..\xfe\r\n.\r\n"),
    ],
)
def test_encode_data(body: bytes, wire: bytes) -> None:
    assert commands.encode_data(body) == wire
    assert commands.decode_data(wire) == commands.normalize_line_endings(body)


def test_dot_stuff() -> None:
    assert commands.dot_stuff(b".a\r\nb.\r\n.\r\n") == b"..a\r\nb.\r\n..\r\n"


@pytest.mark.parametrize("wire", [b"", b"abc", b"abc\r\n", b"abc.\r\n", b"abc\n.\r\n"])
def test_decode_data_refuses_unterminated(wire: bytes) -> None:
    with pytest.raises(ProtocolError):
        commands.decode_data(wire)


_BODY_BYTES = st.binary(max_size=300) | st.lists(
    st.sampled_from([b".", b"..", b"\r", b"\n", b"\r\n", b"x", b"\xff", b" ", b"\x00"]), max_size=40
).map(b"".join)


@given(_BODY_BYTES)
def test_encode_data_properties(body: bytes) -> None:
    wire = commands.encode_data(body)
    assert commands.decode_data(wire) == commands.normalize_line_endings(body)
    assert wire.endswith(b"\r\n.\r\n") or wire == b".\r\n"
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", wire) is None
    lines = wire.split(b"\r\n")
    assert lines[-2:] == [b".", b""]
    assert b"." not in lines[:-2]
    assert all(not line.startswith(b".") or line.startswith(b"..") for line in lines[:-2])
