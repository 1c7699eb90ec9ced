"""The mail model: a validated, immutable ``Mail`` built from the JSON schema producers enqueue.

Every entry point (Python API, CLI, JSON Lines, HTTP) goes through :meth:`Mail.from_dict` (by way of
:func:`dispatcher.mail.mime.validated`, which adds the size limit), collecting *all* problems into one
``ValidationError({field_path: problem})``. ``Mail.to_dict`` is the JSON-safe form
stored with the job; it carries the ``message_id`` and ``date`` generated once at validation, so every
later attempt rebuilds byte-identical MIME (see :mod:`dispatcher.mail.mime`).
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import make_msgid
from types import MappingProxyType
from typing import Any, cast

from dispatcher.errors import ValidationError
from dispatcher.mail import fields, limits
from dispatcher.mail.addresses import Address
from dispatcher.mail.attachments import Attachment
from dispatcher.mail.attachments import attachments as attachment_parts
from dispatcher.mail.fields import DEFAULT_ROUTE, MetadataValue, Priority

DEFAULT_MAX_BYTES = 25 * 1024 * 1024
FIELDS = frozenset(
    {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments", "headers", "metadata",
     "key", "send_at", "priority", "route", "message_id", "date"}
)  # fmt: skip


_NO_METADATA: Mapping[str, MetadataValue] = MappingProxyType({})
"""The metadata of every mail without any: read-only, so one proxy serves them all."""


@dataclass(frozen=True)
class Mail:
    """A validated mail. Build it with :meth:`from_dict`; the constructor does not validate."""

    from_address: Address
    to: tuple[Address, ...]
    cc: tuple[Address, ...]
    bcc: tuple[Address, ...]
    reply_to: tuple[Address, ...]
    subject: str
    text: str | None
    html: str | None
    attachments: tuple[Attachment, ...]
    headers: tuple[tuple[str, str], ...]
    metadata: Mapping[str, MetadataValue] = field(hash=False)
    key: str | None
    send_at: datetime | None
    priority: Priority
    route: str
    message_id: str
    date: str
    raw: bytes = field(default=b"", compare=False, repr=False)
    """The MIME bytes, built once at validation: every attempt sends exactly these."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, max_recipients: int | None = None) -> Mail:
        """Validate the JSON schema field by field; raise ``ValidationError`` listing every problem found.

        ``max_recipients`` caps to + cc + bcc (``None``: no cap — a worker rebuilding a mail accepted under
        its producer's cap). The checks that need the MIME bytes (the size limit) are
        ``dispatcher.mail.mime.validated``'s.
        """
        if not isinstance(data, Mapping):
            raise ValidationError({"mail": "must be an object"})
        unencodable = fields.unencodable_text(data)
        if unencodable:  # a lone surrogate cannot be written as UTF-8 anywhere: refuse it before anything
            raise ValidationError(unencodable)
        checker = fields.Checker(data)
        if not FIELDS.issuperset(data):
            checker.problems.update({str(name): "unknown field" for name in data if name not in FIELDS})
        if "from" not in data or data["from"] is None:
            checker.problems["from"] = "missing"
        sender = checker.run("from", fields.one_address)
        too_many = limits.recipients_problem(data, max_recipients)
        if too_many is not None:  # refused before any address is parsed: a long list costs nothing
            checker.problems["recipients"] = too_many
            to = cc = bcc = ()
        else:
            to = checker.run("to", fields.address_list, ())  # limits.RECIPIENT_FIELDS, in their order
            cc = checker.run("cc", fields.address_list, ())
            bcc = checker.run("bcc", fields.address_list, ())
        reply_to = checker.run("reply_to", fields.reply_to, ())
        if not (to or cc or bcc) and not checker.has_problem("to", "cc", "bcc", "recipients"):
            checker.problems["to"] = "missing: at least one recipient in to, cc or bcc"
        text = checker.run("text", fields.body)
        html = checker.run("html", fields.body)
        attachments = checker.run("attachments", attachment_parts, ())
        if not (text or html or attachments) and not checker.has_problem("text", "html", "attachments"):
            checker.problems["text"] = "missing: at least one of text, html or attachments"
        send_at = checker.run("send_at", fields.send_at)
        message_id = checker.run("message_id", fields.message_id)
        if message_id is None and sender is not None:
            domain = sender.domain
            message_id = make_msgid(domain=domain if domain.startswith("[") else fields.ascii_domain(domain))
        # A scheduled mail is dated when it is due, not when it was enqueued.
        date = checker.run("date", fields.date) or fields.date_header(send_at)
        subject = checker.run("subject", fields.subject, "")  # the order of the checks is the problems' order
        headers = checker.run("headers", fields.headers, ())
        metadata = checker.run("metadata", fields.metadata)
        mail = cls(
            from_address=cast(Address, sender),
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            subject=subject,
            text=text,
            html=html,
            attachments=attachments,
            headers=headers,
            metadata=MappingProxyType(metadata) if metadata else _NO_METADATA,
            key=checker.run("key", fields.key),
            send_at=send_at,
            priority=checker.run("priority", fields.priority, "default"),
            route=checker.run("route", fields.route, DEFAULT_ROUTE),
            message_id=message_id or "",
            date=date,
        )
        if checker.problems:
            raise ValidationError(checker.problems)
        return mail

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``Mail.from_dict(mail.to_dict()) == mail``. Empty optional fields are left out."""
        out: dict[str, Any] = {"from": self.from_address.formatted()}
        lists = (("to", self.to), ("cc", self.cc), ("bcc", self.bcc), ("reply_to", self.reply_to))
        for name, addresses in lists:
            if addresses:
                out[name] = [a.formatted() for a in addresses]
        if self.subject:
            out["subject"] = self.subject
        if self.text:
            out["text"] = self.text
        if self.html:
            out["html"] = self.html
        if self.attachments:
            out["attachments"] = [_attachment_dict(a) for a in self.attachments]
        if self.headers:
            out["headers"] = dict(self.headers)
        if self.metadata:
            out["metadata"] = dict(self.metadata)
        if self.key:
            out["key"] = self.key
        if self.send_at is not None:
            out["send_at"] = fields.iso_utc(self.send_at)
        out.update(priority=self.priority, route=self.route, message_id=self.message_id, date=self.date)
        return out

    @property
    def envelope_sender(self) -> str:
        return self.from_address.addr_spec

    @property
    def envelope_recipients(self) -> tuple[str, ...]:
        """to + cc + bcc addr-specs, duplicates (compared case-insensitively) removed, first one kept."""
        seen: set[str] = set()
        out: list[str] = []
        for address in (*self.to, *self.cc, *self.bcc):
            folded = address.addr_spec.casefold()
            if folded not in seen:
                seen.add(folded)
                out.append(address.addr_spec)
        return tuple(out)

    @property
    def recipient_domains(self) -> tuple[str, ...]:
        """Distinct lower-cased domains of the envelope recipients, in first-seen order."""
        return tuple(dict.fromkeys(r.rpartition("@")[2].lower() for r in self.envelope_recipients))

    @property
    def needs_smtputf8(self) -> bool:
        """True when any address (envelope or header: from, to, cc, bcc, reply_to) is not ASCII.

        Reply-To counts too: a UTF-8 mailbox in a header cannot be written without RFC 6532 UTF-8 headers.
        """
        addresses = (self.from_address, *self.to, *self.cc, *self.bcc, *self.reply_to)
        return not all(address.is_ascii for address in addresses)


def _attachment_dict(attachment: Attachment) -> dict[str, Any]:
    out: dict[str, Any] = {
        "filename": attachment.filename,
        "content_type": attachment.content_type,
        "content": base64.b64encode(attachment.content).decode("ascii"),
        "content_id": attachment.content_id,
        "disposition": attachment.disposition if attachment.disposition != "attachment" else None,
        "charset": attachment.charset,
    }
    return {name: value for name, value in out.items() if value is not None}
