"""Every line the client sends, built in one place, and the message data encoding.

``command_line`` is the one choke point: a CR, LF, NUL or other control character in any argument
would let an address or name inject a second command (or end the DATA section early), so it is refused
before anything reaches the socket. Message data is normalised to CRLF line endings, dot-stuffed and
terminated with CRLF.CRLF (RFC 5321 §4.5.2), never carrying a bare CR or LF that a server might read as a
line end: SMTP smuggling, CVE-2023-51764 and relatives.
"""

from __future__ import annotations

import ipaddress
import re

from dispatcher.errors import InvalidCommandArgument, ProtocolError

MAX_COMMAND_LINE = 2048
"""Octets, CRLF included. RFC 5321 §4.5.3.1.4 says 512; SMTPUTF8 addresses and parameters need more."""

MAX_AUTH_LINE = 12288
"""Octets for AUTH and SASL response lines (RFC 4954 §4): OAuth2 bearer tokens run past 2 KB."""

MAX_ADDRESS_OCTETS = 254
"""RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its angle brackets (the mail model checks the
same limit: ``dispatcher.mail.addresses`` uses this constant)."""
DATA_TERMINATOR = b".\r\n"
BODY_TYPES = frozenset({"7BIT", "8BITMIME", "BINARYMIME"})

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LINE_ENDING = re.compile(rb"\r\n|\r|\n")
_LINE_START_DOT = re.compile(rb"^\.", re.MULTILINE)
_VERB = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_SASL_MECHANISM = re.compile(r"[A-Z0-9_-]{1,20}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_GENERAL_LITERAL = re.compile(r"[A-Za-z0-9-]*[A-Za-z0-9]:[\x21-\x5a\x5e-\x7e]+")
_EXCERPT_CHARS = 60


def _shown(text: str) -> str:
    shown = repr(text[:_EXCERPT_CHARS])
    return shown + "..." if len(text) > _EXCERPT_CHARS else shown


def _refuse(message: str) -> InvalidCommandArgument:
    return InvalidCommandArgument(message, transient=False)


def _check_controls(text: str, what: str) -> None:
    match = _CONTROL.search(text)
    if match is not None:
        raise _refuse(f"{what} {_shown(text)} contains control character U+{ord(match.group()):04X}")


def _encode_line(text: str, limit: int) -> bytes:
    try:
        line = text.encode("utf-8") + b"\r\n"
    except UnicodeEncodeError as exc:
        raise _refuse(f"line {_shown(text)} cannot be encoded as UTF-8") from exc
    if len(line) > limit:
        raise _refuse(f"line {_shown(text)} is {len(line)} octets, longer than {limit}")
    return line


def command_line(verb: str, *args: str, limit: int = MAX_COMMAND_LINE) -> bytes:
    """``b"VERB arg1 arg2\\r\\n"``, or InvalidCommandArgument if any part could break the line."""
    _check_controls(verb, "verb")
    if _VERB.fullmatch(verb) is None:
        raise _refuse(f"verb {_shown(verb)} is not a command name")
    for arg in args:
        _check_controls(arg, "argument")
        if not arg:
            raise _refuse(f"empty argument to {verb}")
    return _encode_line(" ".join((verb, *args)), limit)


def sasl_response(data: str) -> bytes:
    """A client line inside an AUTH exchange (base64, ``*`` to cancel, or empty)."""
    _check_controls(data, "SASL response")
    return _encode_line(data, MAX_AUTH_LINE)


def is_ascii(text: str) -> bool:
    return text.isascii()


def check_address(address: str, field: str) -> str:
    """Refuse an envelope address that cannot go between ``<`` and ``>``; ``""`` only as sender."""
    if not address:
        if field == "sender":
            return address
        raise _refuse(f"{field} address is empty")
    _check_controls(address, f"{field} address")
    if "<" in address or ">" in address:
        raise _refuse(f"{field} address {_shown(address)} contains '<' or '>'")
    if address.split() != [address]:  # any character str.isspace calls white space, in one C call
        raise _refuse(f"{field} address {_shown(address)} contains whitespace")
    octets = len(address.encode("utf-8", errors="surrogatepass"))
    if octets > MAX_ADDRESS_OCTETS:
        raise _refuse(f"{field} address {_shown(address)} is {octets} octets, more than {MAX_ADDRESS_OCTETS}")
    return address


def _is_address_literal(inner: str) -> bool:
    if inner[:5].upper() == "IPV6:":
        try:
            ipaddress.IPv6Address(inner[5:])
        except ValueError:
            return False
        return True
    try:
        ipaddress.IPv4Address(inner)
    except ValueError:
        return _GENERAL_LITERAL.fullmatch(inner) is not None
    return True


def check_ehlo_name(name: str) -> str:
    """A domain name or an address literal (``[192.0.2.1]``, ``[IPv6:2001:db8::1]``)."""
    _check_controls(name, "EHLO name")
    if name.startswith("[") and name.endswith("]") and _is_address_literal(name[1:-1]):
        return name
    if len(name) <= 255 and _DOMAIN.fullmatch(name) is not None:
        return name
    raise _refuse(f"EHLO name {_shown(name)} is neither a domain name nor an address literal")


def ehlo(name: str) -> bytes:
    return command_line("EHLO", check_ehlo_name(name))


def helo(name: str) -> bytes:
    return command_line("HELO", check_ehlo_name(name))


def _check_size(size: int, what: str) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise _refuse(f"{what} must be a non-negative int, got {size!r}")
    return size


def mail_from(
    sender: str, *, size: int | None = None, body: str | None = None, smtputf8: bool = False
) -> bytes:
    """``MAIL FROM:<sender> [SIZE=n] [BODY=type] [SMTPUTF8]``; whether the server offers each is the
    caller's business."""
    args = [f"FROM:<{check_address(sender, 'sender')}>"]
    if size is not None:
        args.append(f"SIZE={_check_size(size, 'SIZE')}")
    if body is not None:
        if body.upper() not in BODY_TYPES:
            raise _refuse(f"BODY {_shown(body)} is not one of {', '.join(sorted(BODY_TYPES))}")
        args.append(f"BODY={body.upper()}")
    if smtputf8:
        args.append("SMTPUTF8")
    return command_line("MAIL", *args)


def rcpt_to(recipient: str) -> bytes:
    return command_line("RCPT", f"TO:<{check_address(recipient, 'recipient')}>")


def data() -> bytes:
    return command_line("DATA")


def bdat(size: int, *, last: bool = True) -> bytes:
    """``BDAT <size> [LAST]`` (RFC 3030); the chunk's bytes follow unencoded."""
    args = [str(_check_size(size, "BDAT size"))]
    if last:
        args.append("LAST")
    return command_line("BDAT", *args)


def rset() -> bytes:
    return command_line("RSET")


def noop() -> bytes:
    return command_line("NOOP")


def quit() -> bytes:
    return command_line("QUIT")


def starttls() -> bytes:
    return command_line("STARTTLS")


def auth(mechanism: str, initial_response: str | None = None) -> bytes:
    """``AUTH <mechanism> [initial-response]``; an empty initial response is sent as ``=`` (RFC 4954)."""
    _check_controls(mechanism, "SASL mechanism")
    if _SASL_MECHANISM.fullmatch(mechanism) is None:
        raise _refuse(f"SASL mechanism {_shown(mechanism)} is not an uppercase mechanism name")
    if initial_response is None:
        return command_line("AUTH", mechanism, limit=MAX_AUTH_LINE)
    return command_line("AUTH", mechanism, initial_response or "=", limit=MAX_AUTH_LINE)


def normalize_line_endings(data: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF; non-empty data ends with CRLF. Data that is so
    already (what ``build_message`` writes) comes back as it is, found by three counts in C."""
    crlf = data.count(b"\r\n")
    if data.count(b"\r") == crlf == data.count(b"\n") and (not data or data.endswith(b"\r\n")):
        return data
    normalized = _LINE_ENDING.sub(b"\r\n", data)
    if normalized and not normalized.endswith(b"\r\n"):
        normalized += b"\r\n"
    return normalized


def dot_stuff(data: bytes) -> bytes:
    """Double the leading dot of every line (RFC 5321 §4.5.2). Expects normalised input."""
    return _LINE_START_DOT.sub(b"..", data)


def encode_data(data: bytes) -> bytes:
    """Message bytes as sent after 354: CRLF only, dot-stuffed, ending in CRLF.CRLF."""
    return dot_stuff(normalize_line_endings(data)) + DATA_TERMINATOR


def decode_data(wire: bytes) -> bytes:
    """The inverse of ``encode_data``, for tests and servers: drop the final dot, un-stuff."""
    if wire == DATA_TERMINATOR:
        return b""
    if not wire.endswith(b"\r\n" + DATA_TERMINATOR):
        raise ProtocolError(f"message data does not end with CRLF.CRLF: {wire[-20:]!r}")
    return _LINE_START_DOT.sub(b"", wire[: -len(DATA_TERMINATOR)])


def has_8bit(data: bytes) -> bool:
    return not data.isascii()
