"""Today's MIME builder (dispatcher/mail/mime.py before issue 15), frozen: the ``EmailMessage`` /
``policy.default`` build whose output the fast compat32 builder must match in structure.

Test-only: ``tests/test_mime_equivalence.py`` parses this builder's bytes and the new one's and compares
them; ``bench.mime --against`` times the same code from git. Not to be changed with the builder.
"""

from __future__ import annotations

import hashlib
import re
from email import errors as email_errors
from email import policy as email_policy
from email.message import EmailMessage
from typing import Any, cast

from dispatcher.errors import HeaderInjection
from dispatcher.mail import address_header
from dispatcher.mail.message import Mail

_BASE64_THRESHOLD = 1 / 6
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_FIELD_OF_HEADER = {"from": "from", "to": "to", "cc": "cc", "reply-to": "reply_to", "subject": "subject",
                    "date": "date", "message-id": "message_id"}  # fmt: skip


def build_message(mail: Mail) -> bytes:
    """The RFC 5322 message for ``mail``: CRLF line ends, lines <= 998 octets, 7-bit unless the mail
    has UTF-8 addresses (then UTF-8 headers per RFC 6532, to be sent with SMTPUTF8).

    Raises ``HeaderInjection`` when the written bytes hold a header line that was not asked for.
    """
    message = compose(mail)
    try:
        raw = message.as_bytes(policy=message.policy)
    except email_errors.MessageError as exc:  # 3.13+: HeaderWriteError (verify_generated_headers)
        raise HeaderInjection({"mail": f"the email package refused to write a header: {exc}"}) from exc
    check_written(raw, message)
    return raw


def compose(mail: Mail) -> EmailMessage:
    """The message object ``build_message`` writes (boundaries already fixed)."""
    # Raw (``set_raw``) values are written as given: the address headers, folded by ``address_header``.
    base = email_policy.SMTPUTF8 if mail.needs_smtputf8 else email_policy.SMTP
    options: dict[str, Any] = {**vars(base), "refold_source": "none", "folded": {}}
    policy = _FoldOnce().clone(**options)
    message = EmailMessage(policy=policy)
    for name, addresses in (("From", (mail.from_address,)), ("To", mail.to), ("Cc", mail.cc),
                            ("Reply-To", mail.reply_to)):  # fmt: skip
        if addresses:
            message.set_raw(name, address_header.folded(name, addresses, utf8=policy.utf8))
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
    # Related parts (inline images an HTML body shows by cid:) first: the body and they share one
    # multipart/related (RFC 2387), which the attachments' multipart/mixed then holds. A text + HTML body
    # goes into it whole, related[alternative[text, html], images...] — what Django's
    # ``mixed_subtype = "related"`` writes; the email package would only nest it the other way round.
    if any(a.is_related for a in mail.attachments) and message.get_content_subtype() == "alternative":
        message.make_mixed()
        message.set_type("multipart/related")
    for attachment in sorted(mail.attachments, key=lambda a: not a.is_related):
        add = message.add_related if attachment.is_related else message.add_attachment
        add(
            attachment.content,
            maintype=attachment.maintype,
            subtype=attachment.subtype,
            filename=attachment.filename,
            disposition=attachment.disposition,
            cid=attachment.content_id,
        )
        if attachment.charset is not None:
            cast(list[EmailMessage], message.get_payload())[-1].set_param("charset", attachment.charset)
    _tidy_parts(message, mail.message_id)
    return message


class _FoldOnce(email_policy.EmailPolicy):
    """A policy that folds each header value once per message: ``check_written`` reuses what the
    generator wrote instead of folding it again (the email package's folding is most of a build's time)."""

    folded: dict[tuple[str, int], bytes] | None = None
    """(name, id of the header value object) -> its folded bytes; the values live as long as the message."""

    def fold_binary(self, name: str, value: Any) -> bytes:
        if self.folded is None:
            return super().fold_binary(name, value)
        key = (name, id(value))
        found = self.folded.get(key)
        if found is None:
            found = self.folded[key] = super().fold_binary(name, value)
        return found


def check_written(raw: bytes, message: EmailMessage) -> None:
    """Raise ``HeaderInjection`` unless every header block in ``raw`` is exactly the one its part in
    ``message`` was given.

    Each header is folded again (``policy.fold_binary``, what the generator writes) and must be one
    ``Name:`` line plus folded continuations (a line break is only ever CRLF followed by SP or HTAB), end
    with CRLF, and hold no control byte but HTAB — what newer Pythons' ``verify_generated_headers``
    checks (not in 3.13.0's ``as_bytes``: a file name gets through), here on every version. Then each
    part's written block must be exactly those headers, in order, and the empty line. The blocks are found
    without parsing bodies: the message's starts at 0, each part's right after a delimiter line
    ``--<boundary>`` of its parent (the boundaries are ours and no body line can hold one, see the module
    doc), in ``message.walk()`` order.
    """
    policy = message.policy
    parts = list(message.walk())
    starts = [0]
    for part in parts:
        boundary = part.get_boundary() if part.is_multipart() else None
        if boundary is None:
            continue
        delimiter = b"\r\n--" + boundary.encode("ascii") + b"\r\n"
        found = raw.find(delimiter)
        while found >= 0:
            starts.append(found + len(delimiter))
            found = raw.find(delimiter, found + 1)
    if len(starts) != len(parts):
        raise _injection("mail", f"{len(starts)} MIME parts written where {len(parts)} were built")
    for index, (part, start) in enumerate(zip(parts, sorted(starts), strict=True)):
        where = "the message's header block" if index == 0 else f"the header block of MIME part {index}"
        folded = [(name, policy.fold_binary(name, value)) for name, value in part.raw_items()]
        for name, lines in folded:
            problem = _folding_problem(name, lines)
            if problem is not None:
                raise _injection(_field(name.lower(), index, part), f"{where}: {name} {problem}")
        block = b"".join(lines for _, lines in folded) + b"\r\n"
        if raw[start : start + len(block)] != block:
            end = raw.find(b"\r\n\r\n", start)
            if end < 0:
                raise _injection("mail", f"{where} never ends")
            _check_block(raw[start:end].split(b"\r\n"), [name.lower() for name in part], where, index, part)
            raise _injection("mail", f"{where} is not what its headers fold to")


def _folding_problem(name: str, folded: bytes) -> str | None:
    if not folded.endswith(b"\r\n"):
        return "does not end with CRLF"
    lines = folded[:-2].split(b"\r\n")
    match = _HEADER_LINE.match(lines[0])
    if match is None or match[1].decode("ascii").lower() != name.lower():
        return "is not written as its own header line"
    for line in lines:
        if _BAD_BYTE.search(line):
            return "holds a line break or control byte that is not folding"
    if any(line[:1] not in (b" ", b"\t") for line in lines[1:]):
        return "holds a line break that starts a new line (not a folded continuation)"
    return None


def _check_block(lines: list[bytes], expected: list[str], where: str, index: int, part: EmailMessage) -> None:
    """Say which header the written ``lines`` of one block went wrong at (they differ from the folding)."""
    written: list[str] = []
    for line in lines:
        if _BAD_BYTE.search(line):
            culprit = written[-1] if written else expected[0]
            raise _injection(
                _field(culprit, index, part), f"{where}: a line break or control byte in {culprit}"
            )
        if line[:1] in (b" ", b"\t"):
            if not written:
                raise _injection("mail", f"{where} starts with a continuation line")
            continue
        match = _HEADER_LINE.match(line)
        if match is None:
            culprit = written[-1] if written else expected[0]
            raise _injection(
                _field(culprit, index, part), f"{where}: a line that is no header after {culprit}"
            )
        written.append(match[1].decode("ascii").lower())
    if written != expected:
        diverge = next(
            (i for i, (a, b) in enumerate(zip(written, expected, strict=False)) if a != b),
            min(map(len, (written, expected))),
        )
        culprit = written[diverge - 1] if diverge > 0 else expected[0]
        raise _injection(
            _field(culprit, index, part),
            f"{where}: header lines {written} written where {expected} were set",
        )


def _field(header: str, index: int, part: EmailMessage) -> str:
    """The JSON field a header line came from, as ``ValidationError.problems`` names it."""
    if index > 0:
        return "attachments" if part.get_content_disposition() == "attachment" else "mail"
    if header in _FIELD_OF_HEADER:
        return _FIELD_OF_HEADER[header]
    name = next((key for key in part if key.lower() == header), None)
    return f"headers.{name}" if name is not None and not header.startswith(("content-", "mime-")) else "mail"


def _injection(field: str, detail: str) -> HeaderInjection:
    return HeaderInjection({field: f"header injection, refused: {detail}"})


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
