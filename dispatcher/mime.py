"""MIME building with the stdlib ``email`` package: ``Mail`` in, wire-ready CRLF bytes out.

The output is a pure function of the ``Mail``: the same bytes in every call and every process, so a retry
sends exactly what the first attempt sent. Date and Message-ID come from the mail (fixed at validation);
the MIME boundaries, which the email package would pick at random, are derived from the Message-ID.

Boundaries look like ``=_<hex>.<n>``. Every body is quoted-printable or base64, and neither encoding can
ever produce ``=_`` (in quoted-printable ``=`` is followed by two hex digits or a line end; base64 has no
``_``), so no body line can contain or fake a boundary, whatever the content.

Bcc is never written: it lives in the envelope only.
"""

from __future__ import annotations

import hashlib
import re
from email import policy as email_policy
from email.message import EmailMessage
from typing import TYPE_CHECKING

from dispatcher.addresses import control_character_problem

if TYPE_CHECKING:
    from dispatcher.addresses import Address
    from dispatcher.message import Mail

# Headers dispatcher writes itself (plus every Content-*) or trace/address headers it will not take from
# producers: a custom header with one of these names could contradict ours or smuggle recipients.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "mime-version", "return-path",
     "received", "sender", "resent-from", "resent-to", "resent-cc", "resent-bcc", "resent-sender",
     "resent-date", "resent-message-id", "orig-date", "delivered-to"}
)  # fmt: skip

HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext
MAX_LINE_OCTETS = 998  # RFC 5322 §2.1.1

# Above this share of non-ASCII UTF-8 bytes base64 is shorter than quoted-printable (3 vs 4/3 octets).
_BASE64_THRESHOLD = 1 / 6


def build_message(mail: Mail) -> bytes:
    """The RFC 5322 message for ``mail``: CRLF line ends, lines <= 998 octets, 7-bit unless the mail
    has UTF-8 addresses (then UTF-8 headers per RFC 6532, to be sent with SMTPUTF8)."""
    policy = email_policy.SMTPUTF8 if mail.needs_smtputf8 else email_policy.SMTP
    message = EmailMessage(policy=policy)
    message["From"] = mail.from_address.formatted()
    if mail.to:
        message["To"] = _address_list(mail.to)
    if mail.cc:
        message["Cc"] = _address_list(mail.cc)
    if mail.reply_to:
        message["Reply-To"] = _address_list(mail.reply_to)
    if mail.subject:
        message["Subject"] = mail.subject
    message["Date"] = mail.date
    message["Message-ID"] = mail.message_id
    message["MIME-Version"] = "1.0"
    for name, value in mail.headers:
        message[name] = value

    if mail.text is not None:
        message.set_content(mail.text, subtype="plain", charset="utf-8", cte=_text_encoding(mail.text))
    if mail.html is not None:
        if mail.text is not None:
            message.add_alternative(mail.html, subtype="html", charset="utf-8", cte=_text_encoding(mail.html))
        else:
            message.set_content(mail.html, subtype="html", charset="utf-8", cte=_text_encoding(mail.html))
    for attachment in mail.attachments:
        message.add_attachment(
            attachment.content,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
        )
    _tidy_parts(message, mail.message_id)
    return message.as_bytes(policy=policy)


def _address_list(addresses: tuple[Address, ...]) -> str:
    return ", ".join(address.formatted() for address in addresses)


def _text_encoding(text: str) -> str:
    """Quoted-printable for mostly-ASCII text (readable, compact), base64 for mostly non-ASCII text."""
    encoded = text.encode("utf-8")
    non_ascii = sum(1 for byte in encoded if byte > 0x7E)
    return "base64" if encoded and non_ascii / len(encoded) > _BASE64_THRESHOLD else "quoted-printable"


def _tidy_parts(message: EmailMessage, message_id: str) -> None:
    """Give every multipart a boundary derived from the Message-ID; drop MIME-Version from sub-parts.

    (``add_alternative``/``add_attachment`` make sub-parts of the top-level class, which stamps its own
    MIME-Version header on each; RFC 2045 wants it at the top only.)
    """
    digest = hashlib.sha256(message_id.encode("utf-8")).hexdigest()[:32]
    multiparts = [part for part in message.walk() if part.is_multipart()]
    for index, part in enumerate(multiparts):
        part.set_boundary(f"=_{digest}.{index}")
    for part in message.walk():
        if part is not message:
            del part["MIME-Version"]


def custom_header_problem(name: object, value: object, seen: set[str]) -> str | None:
    """What is wrong with one custom header (``seen``: lower-cased names already accepted), or ``None``.

    The value must survive the email package under both policies :func:`build_message` may use:
    no parse defects (a structured header must parse) and no folded line over 998 octets.
    """
    if not isinstance(name, str) or not HEADER_NAME.fullmatch(name):
        return "not a header field name (printable ASCII, no spaces or ':')"
    lowered = name.lower()
    if lowered in RESERVED_HEADERS or lowered.startswith("content-"):
        return "reserved: dispatcher writes this header itself or does not allow it"
    if lowered in seen:
        return "duplicate header name (names are case-insensitive)"
    if not isinstance(value, str):
        return "must be a string"
    problem = control_character_problem(value)
    if problem is not None:
        return problem
    if _plain_unstructured(lowered, value) and len(name) + 2 + len(value) <= MAX_LINE_OCTETS:
        return None  # printable ASCII in an unstructured header, short enough never to need folding
    for policy in (email_policy.SMTP, email_policy.SMTPUTF8):  # mime picks one of the two
        try:
            header = policy.header_factory(name, value)
            folded = header.fold(policy=policy)
        except (ValueError, IndexError, TypeError) as exc:  # the stdlib parser's failures are undocumented
            return f"malformed: {exc}"
        if header.defects:
            return f"malformed: {header.defects[0]}"
        if max(len(line.encode("utf-8")) for line in folded.splitlines()) > MAX_LINE_OCTETS:
            return f"too long: a line would exceed {MAX_LINE_OCTETS} octets"
    return None


def _plain_unstructured(lowered_name: str, value: str) -> bool:
    """A header the email package treats as unstructured text, with nothing in it to encode or parse."""
    registry = email_policy.SMTP.header_factory.registry  # type: ignore[attr-defined]
    return lowered_name not in registry and value.isascii() and value.isprintable() and "=?" not in value
