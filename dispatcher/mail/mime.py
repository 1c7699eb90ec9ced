"""MIME building with the stdlib ``email`` package: ``Mail`` in, wire-ready CRLF bytes out.

The output is a pure function of the ``Mail``: the same bytes in every call and every process, so a retry
sends exactly what the first attempt sent. Date and Message-ID come from the mail (fixed at validation);
the MIME boundaries, which the email package would pick at random, are derived from the Message-ID.

Boundaries look like ``=_<hex>.<n>``. Every body is quoted-printable or base64, and neither encoding can
ever produce ``=_`` (in quoted-printable ``=`` is followed by two hex digits or a line end; base64 has no
``_``), so no body line can contain or fake a boundary, whatever the content.

Bcc is never written: it lives in the envelope only.

The message is built under compat32 (``header_fold.WirePolicy``): header values stay plain strings and
are folded once, when written, by ``header_fold.field``; the modern policy's header registry, which
parsed and refolded every header (a third of a worker's CPU per mail, issue 15), is left for rare shapes.
Bodies are encoded by the email package's content manager, as ``EmailMessage.set_content`` does. The
output is the same message as the ``EmailMessage`` build before it, to a reader
(``tests/test_mime_equivalence.py``); most mails are the same bytes.

The written bytes are checked before they leave (:func:`check_written`): every part's header block must
hold exactly the header lines that part was given — same names, same count, same order, nothing but
header lines and their folded continuations, no control character. The modern policy of Python 3.11.7
and 3.12.1 decodes RFC 2047 encoded words while it writes and puts a decoded CR LF on the wire
(CVE-2024-6923); in a file name every version up to 3.13 does. Validation refuses such values,
``compose`` refuses them again (a mail that bypassed validation), the fast path writes an encoded word
as it was given, and this check makes sure that whatever the installed email package does, a line break
it was not asked for is a ``HeaderInjection``, never a sent message.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import re
from collections.abc import Callable, Iterator, Mapping
from email import errors as email_errors
from email.contentmanager import raw_data_manager
from email.message import Message, MIMEPart
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any

from dispatcher.errors import HeaderInjection, ValidationError
from dispatcher.mail import address_header, header_fold
from dispatcher.mail.attachments import Attachment
from dispatcher.mail.header_fold import Prefolded
from dispatcher.mail.header_text import header_text_problem
from dispatcher.mail.limits import MAX_RECIPIENTS
from dispatcher.mail.message import DEFAULT_MAX_BYTES, Mail

# Above this share of non-ASCII UTF-8 bytes base64 is shorter than quoted-printable (3 vs 4/3 octets).
_BASE64_THRESHOLD = 1 / 6
_ASCII_BELOW_DEL = bytes(range(0x7F))
_HEADER_LINE = re.compile(rb"([\x21-\x39\x3b-\x7e]+):")  # RFC 5322 §3.6.8 field name and its colon
_BAD_BYTE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")  # controls but HTAB: CR, LF, NUL, ESC ...
# One header field: its name line, continuation lines (CRLF then SP or HTAB), no other control byte.
_TEXT = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_FOLDED_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+):" + _TEXT + rb"(?:\r\n[ \t]" + _TEXT + rb")*\r\n")
# The headers we set, by the field of the JSON schema they come from (for the problem's name).
_FIELD_OF_HEADER = {"from": "from", "to": "to", "cc": "cc", "reply-to": "reply_to", "subject": "subject",
                    "date": "date", "message-id": "message_id"}  # fmt: skip


def validated(
    data: Mapping[str, Any],
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_recipients: int | None = MAX_RECIPIENTS,
    build: bool = True,
) -> Mail:
    """A mail from its JSON form, checked field by field (``Mail.from_dict``, with the recipient cap) and
    for size; raises ``ValidationError`` listing every problem.

    ``build=False`` (the producer) skips building the MIME message — the worker builds it, byte for byte
    the same every time — unless a cheap upper bound of its size says it may exceed ``max_bytes``; then it
    is built and measured exactly. With ``build`` the mail comes back with its ``raw`` bytes.
    """
    mail = Mail.from_dict(data, max_recipients=max_recipients)
    if not build and size_upper_bound(mail) <= max_bytes:
        return mail
    try:
        raw = build_message(mail)
    except ValidationError:
        raise
    except (ValueError, TypeError, IndexError) as exc:  # a stdlib email limit we did not foresee
        raise ValidationError({"mail": f"cannot be written as MIME: {exc}"}) from exc
    if len(raw) > max_bytes:
        raise ValidationError({"size": f"too large: {len(raw)} bytes > limit {max_bytes}"})
    return dataclasses.replace(mail, raw=raw)


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


def compose(mail: Mail) -> MIMEPart:
    """The message object ``build_message`` writes (boundaries already fixed): ``MIMEPart``s under a
    compat32 policy, whose header values are plain strings folded when written (``header_fold``); the
    bodies are encoded by the email package's own content manager, as ``EmailMessage.set_content`` does.

    Header text is checked again here (``header_text_problem``), so a mail that bypassed validation cannot
    hand a hostile encoded word to the wire even where it would be written as it is.
    """
    utf8 = mail.needs_smtputf8
    message = MIMEPart(policy=header_fold.WirePolicy.for_message(utf8=utf8))
    for name, addresses in (("From", (mail.from_address,)), ("To", mail.to), ("Cc", mail.cc),
                            ("Reply-To", mail.reply_to)):  # fmt: skip
        if addresses:
            message.set_raw(name, Prefolded(address_header.folded(name, addresses, utf8=utf8)))
    if mail.subject:
        message["Subject"] = _header_text("subject", mail.subject)
    message["Date"] = _date(mail.date)
    message["Message-ID"] = mail.message_id
    message["MIME-Version"] = "1.0"
    for name, value in mail.headers:
        message[name] = _header_text(f"headers.{name}", value)
    digest = hashlib.sha256(mail.message_id.encode("utf-8")).hexdigest()[:32]
    _fill(message, _tree(mail), (f"=_{digest}.{index}" for index in itertools.count()))
    return message


# A leaf fills in a part; a multipart is its subtype and its children.
_Leaf = Callable[[MIMEPart], None]
_Node = _Leaf | tuple[str, list["_Node"]]


def _tree(mail: Mail) -> _Node | None:
    """The MIME tree of ``mail``: the body (text, HTML, or an alternative of the two) inside a related
    part with the inline parts an HTML body shows by cid: (RFC 2387), inside a mixed part with the
    attachments — related[alternative[text, html], images...], what Django's ``mixed_subtype =
    "related"`` writes."""
    texts = ((mail.text, "plain"), (mail.html, "html"))
    bodies: list[_Node] = [_text_leaf(body, subtype) for body, subtype in texts if body is not None]
    node: _Node | None = bodies[0] if len(bodies) == 1 else ("alternative", bodies) if bodies else None
    for related in (True, False):
        parts: list[_Node] = [_attachment_leaf(a) for a in mail.attachments if a.is_related == related]
        if parts:
            node = ("related" if related else "mixed", parts if node is None else [node, *parts])
    return node


def _fill(part: MIMEPart, node: _Node | None, boundaries: Iterator[str]) -> None:
    """Write ``node`` into ``part``; multiparts get their boundaries in ``walk()`` order."""
    if node is None:
        return
    if callable(node):
        node(part)
        return
    subtype, children = node
    part["Content-Type"] = f"multipart/{subtype}"
    part.set_param("boundary", next(boundaries))
    part.set_payload([])
    for child in children:
        sub = MIMEPart(policy=part.policy)
        _fill(sub, child, boundaries)
        part.attach(sub)


def _text_leaf(text: str, subtype: str) -> _Leaf:
    def fill(part: MIMEPart) -> None:
        part.set_content(
            text, subtype=subtype, charset="utf-8", cte=_text_encoding(text), content_manager=raw_data_manager
        )

    return fill


def _attachment_leaf(attachment: Attachment) -> _Leaf:
    if attachment.filename is not None:
        _header_text("attachments", attachment.filename)

    def fill(part: MIMEPart) -> None:
        part.set_content(
            attachment.content,
            attachment.maintype,
            attachment.subtype,
            disposition=attachment.disposition,
            filename=attachment.filename,
            cid=attachment.content_id,
            params=None if attachment.charset is None else {"charset": attachment.charset},
            content_manager=raw_data_manager,
        )

    return fill


def _header_text(field: str, value: str) -> str:
    problem = header_text_problem(value)
    if problem is not None:
        raise _injection(field, problem)
    return value


@functools.lru_cache(maxsize=64)  # mails enqueued together share their second
def _date(date: str) -> str:
    """The Date as the email package writes it (a Date header holds its parsed time, formatted again)."""
    try:
        return format_datetime(parsedate_to_datetime(date))
    except (ValueError, TypeError):
        return date


def check_written(raw: bytes, message: Message) -> None:
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
    match = _FOLDED_FIELD.fullmatch(folded)
    if match is not None and match[1].lower() == name.lower().encode("ascii", "replace"):
        return None  # the common case in one regular expression; else say what is wrong
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


def _check_block(lines: list[bytes], expected: list[str], where: str, index: int, part: Message) -> None:
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


def _field(header: str, index: int, part: Message) -> str:
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
    non_ascii = len(encoded.translate(None, _ASCII_BELOW_DEL))  # the bytes > 0x7E, counted in C
    return "base64" if encoded and non_ascii / len(encoded) > _BASE64_THRESHOLD else "quoted-printable"


def size_upper_bound(mail: Mail) -> int:
    """More bytes than ``build_message(mail)`` can produce: every body byte quoted-printable at worst
    (3 bytes, plus soft line breaks), attachments base64 (4/3, plus line ends), headers RFC 2047-encoded."""
    text_bytes = _utf8_length(mail.text or "") + _utf8_length(mail.html or "")
    header_bytes = _utf8_length(mail.subject) + _utf8_length(mail.message_id) + _utf8_length(mail.date)
    for _, value in mail.headers:
        header_bytes += _utf8_length(value)
    for address in (mail.from_address, *mail.to, *mail.cc, *mail.reply_to):
        header_bytes += _utf8_length(address.formatted())
    attachment_bytes = 0
    for a in mail.attachments:
        attachment_bytes += len(a.content) * 4 // 3 + len(a.content) // 38
        attachment_bytes += len(a.filename or "") * 4 + len(a.content_id or "")
    return 4 * text_bytes + 4 * header_bytes + attachment_bytes + 2048 * (3 + len(mail.attachments))


def _utf8_length(text: str) -> int:
    """``len(text.encode("utf-8"))``, without the copy for ASCII text (one octet a character)."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))
