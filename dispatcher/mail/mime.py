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

import dataclasses
import hashlib
from collections.abc import Mapping
from email import policy as email_policy
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

from dispatcher.errors import ValidationError
from dispatcher.mail.message import DEFAULT_MAX_BYTES, Mail

if TYPE_CHECKING:
    from dispatcher.mail.addresses import Address

# Above this share of non-ASCII UTF-8 bytes base64 is shorter than quoted-printable (3 vs 4/3 octets).
_BASE64_THRESHOLD = 1 / 6


def validated(data: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES, build: bool = True) -> Mail:
    """A mail from its JSON form, checked field by field (``Mail.from_dict``) and for size; raises
    ``ValidationError`` listing every problem.

    ``build=False`` (the producer) skips building the MIME message — the worker builds it, byte for byte
    the same every time — unless a cheap upper bound of its size says it may exceed ``max_bytes``; then it
    is built and measured exactly. With ``build`` the mail comes back with its ``raw`` bytes.
    """
    mail = Mail.from_dict(data)
    if not build and size_upper_bound(mail) <= max_bytes:
        return mail
    try:
        raw = build_message(mail)
    except (ValueError, TypeError, IndexError) as exc:  # a stdlib email limit we did not foresee
        raise ValidationError({"mail": f"cannot be written as MIME: {exc}"}) from exc
    if len(raw) > max_bytes:
        raise ValidationError({"size": f"too large: {len(raw)} bytes > limit {max_bytes}"})
    return dataclasses.replace(mail, raw=raw)


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


def size_upper_bound(mail: Mail) -> int:
    """More bytes than ``build_message(mail)`` can produce: every body byte quoted-printable at worst
    (3 bytes, plus soft line breaks), attachments base64 (4/3, plus line ends), headers RFC 2047-encoded."""
    text_bytes = sum(len(part.encode("utf-8")) for part in (mail.text, mail.html) if part)
    header_text = [mail.subject, *(value for _, value in mail.headers), mail.message_id, mail.date]
    addresses = (mail.from_address, *mail.to, *mail.cc, *mail.reply_to)
    header_bytes = sum(len(value.encode("utf-8")) for value in header_text)
    header_bytes += sum(len(a.formatted().encode("utf-8")) for a in addresses)
    attachment_bytes = sum(
        len(a.content) * 4 // 3 + len(a.content) // 38 + len(a.filename) * 4 for a in mail.attachments
    )
    return 4 * text_bytes + 4 * header_bytes + attachment_bytes + 2048 * (3 + len(mail.attachments))
