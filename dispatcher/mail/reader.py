"""A MIME message read back into the JSON mail schema: how a framework's own rendering (Django's
``EmailMessage.message()``) is queued without passing raw MIME around.

Only shapes :func:`dispatcher.mail.mime.build_message` writes again, part for part, are read: a text and/or
HTML body (a leaf or a ``multipart/alternative`` of the two), inside ``multipart/related`` and/or
``multipart/mixed`` with single-part attachments (inline ones with a ``Content-ID``). Anything else — a
``message/rfc822`` attachment, an alternative that is not text/plain or text/html, a part header we
would not write — is a ``ValidationError`` naming where it is, never a silently different message.
"""

from __future__ import annotations

import base64
import email
from email import errors
from email import policy as email_policy
from email.message import EmailMessage, Message
from typing import Any, cast

from dispatcher.errors import ValidationError

_BODY_TYPES = {"text/plain": "text", "text/html": "html"}
_ADDRESS_HEADERS = {"from": "from", "to": "to", "cc": "cc", "reply-to": "reply_to"}
_FIELD_HEADERS = {"subject": "subject", "date": "date", "message-id": "message_id"}
_WRITTEN_BY_MIME = frozenset({"mime-version", "content-type", "content-transfer-encoding"})
_PART_HEADERS = frozenset({*_WRITTEN_BY_MIME, "content-disposition", "content-id"})
_CONTAINERS = frozenset({"multipart/mixed", "multipart/related"})


def parse(raw: bytes) -> EmailMessage:
    """``raw`` parsed with the modern policy (headers decoded, ``get_content`` available)."""
    return email.message_from_bytes(raw, policy=email_policy.default)


def mail_from_mime(message: Message) -> dict[str, Any]:
    """The schema fields ``message`` holds (no envelope: Bcc is not in a message); raises
    ``ValidationError`` naming every part or header that cannot be queued as it is."""
    parsed = message if isinstance(message, EmailMessage) else parse(message.as_bytes())
    reader = _Reader()
    data = reader.headers(parsed)
    reader.content(parsed, data, top=True)
    if reader.problems:
        raise ValidationError(reader.problems)
    return data


class _Reader:
    def __init__(self) -> None:
        self.problems: dict[str, str] = {}
        self.attachments: list[dict[str, Any]] = []

    def headers(self, message: EmailMessage) -> dict[str, Any]:
        data: dict[str, Any] = {}
        custom: dict[str, str] = {}
        for name, raw in message.raw_items():
            lowered = name.lower()
            if lowered in _WRITTEN_BY_MIME:
                continue
            field = _ADDRESS_HEADERS.get(lowered) or _FIELD_HEADERS.get(lowered)
            target, key = (data, field) if field is not None else (custom, name)
            if any(k.lower() == key.lower() for k in target):
                self.problems[f"headers.{name}"] = "given twice: a header can be queued once"
                continue
            target[key] = _decoded(message, name, lowered in _ADDRESS_HEADERS, raw)
        if custom:
            data["headers"] = custom
        return data

    def content(self, part: EmailMessage, data: dict[str, Any], *, top: bool = False) -> None:
        kind = part.get_content_type()
        if _is_body(part):
            data[_BODY_TYPES[kind]] = part.get_content()
        elif kind == "multipart/alternative":
            for index, alternative in enumerate(cast(list[EmailMessage], part.get_payload())):
                if not _is_body(alternative) or _BODY_TYPES[alternative.get_content_type()] in data:
                    self.problems[f"alternatives[{index}]"] = (
                        f"{alternative.get_content_type()}: only one text/plain and one text/html "
                        "alternative can be queued"
                    )
                    continue
                data[_BODY_TYPES[alternative.get_content_type()]] = alternative.get_content()
        elif kind in _CONTAINERS:
            children = cast(list[EmailMessage], part.get_payload())
            first = children[0] if children else None
            if first is not None and (_is_body(first) or first.get_content_type().startswith("multipart/")):
                self.content(first, data)
                children = children[1:]
            for child in children:
                self.attachment(child, related=kind == "multipart/related")
        elif top:
            self.problems["mail"] = f"a {kind} message cannot be queued: it has no text or HTML body"
        else:
            self.problems["mail"] = f"a {kind} part where a body was expected"
        if top and self.attachments:
            data["attachments"] = self.attachments

    def attachment(self, part: EmailMessage, *, related: bool) -> None:
        where = f"attachments[{len(self.attachments)}]"
        kind = part.get_content_type()
        if part.is_multipart() or kind.startswith("message/"):
            self.problems[where] = f"a {kind} part cannot be queued: only single parts (files) can"
            return
        for name in part:
            if name.lower() not in _PART_HEADERS:
                self.problems[f"{where}.headers.{name}"] = "a part header dispatcher does not write"
        content_id = part.get("Content-ID")
        disposition = part.get_content_disposition()
        if disposition is None:
            disposition = "inline" if content_id is not None and related else "attachment"
        item: dict[str, Any] = {
            "filename": part.get_filename(),
            "content_type": kind,
            "content": base64.b64encode(cast(bytes, part.get_payload(decode=True))).decode("ascii"),
            "content_id": None if content_id is None else str(content_id),
            "disposition": disposition,
            "charset": part.get_param("charset") if kind.startswith("text/") else None,
        }
        self.attachments.append({name: value for name, value in item.items() if value is not None})


def _is_body(part: EmailMessage) -> bool:
    return (
        part.get_content_type() in _BODY_TYPES
        and part.get_content_disposition() in (None, "inline")
        and part.get_filename() is None
        and part.get("Content-ID") is None
    )


def _decoded(message: EmailMessage, name: str, addresses: bool, raw: str) -> Any:
    """The header's decoded value (a list of addresses for an address header); what the email package
    cannot parse is given on as written, for validation to name what is wrong with it."""
    try:
        header = message[name]
        if addresses:
            found = [str(address) for address in header.addresses]
            return found if name.lower() != "from" else found[0] if len(found) == 1 else str(header)
        return str(header)
    except (errors.HeaderParseError, IndexError, ValueError, TypeError):  # undocumented parser failures
        return raw
