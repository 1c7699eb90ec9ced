"""The mail model: a validated, immutable ``Mail`` built from the JSON schema producers enqueue.

Every entry point (Python API, CLI, JSON Lines, HTTP) goes through :meth:`Mail.from_dict`, which collects
*all* problems into one ``ValidationError({field_path: problem})``. ``Mail.to_dict`` is the JSON-safe form
stored with the job; it carries the ``message_id`` and ``date`` generated once at validation, so every
later attempt rebuilds byte-identical MIME (see :mod:`dispatcher.mime`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime, make_msgid, parsedate_to_datetime
from types import MappingProxyType
from typing import Any, Literal, TypeVar, cast

from dispatcher.addresses import Address, control_character_problem, parse_address
from dispatcher.errors import ValidationError
from dispatcher.mime import build_message, custom_header_problem

DEFAULT_MAX_BYTES = 25 * 1024 * 1024
MAX_METADATA_BYTES = 4096
MAX_KEY_LENGTH = 200
MAX_FILENAME_LENGTH = 255

Priority = Literal["high", "default", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("high", "default", "bulk")
DEFAULT_ROUTE = "default"

MetadataValue = str | int | float | bool | None

FIELDS = frozenset(
    {"from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "attachments", "headers", "metadata",
     "key", "send_at", "priority", "route", "message_id", "date"}
)  # fmt: skip
ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content"})
_ROUTE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MIME_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(rf"({_MIME_TOKEN})/({_MIME_TOKEN})")
_MESSAGE_ID = re.compile(r"<[\x21-\x3b\x3d\x3f\x41-\x7e]+@[\x21-\x3b\x3d\x3f-\x7e]+>")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str
    content: bytes

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    @property
    def subtype(self) -> str:
        return self.content_type.partition("/")[2]


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
    def from_dict(
        cls, data: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_BYTES, build: bool = True
    ) -> Mail:
        """Validate the JSON schema; raise ``ValidationError`` listing every problem found.

        ``build=False`` (the producer) skips building the MIME message — the worker builds it, byte for
        byte the same every time — unless a cheap upper bound of its size says it may exceed ``max_bytes``;
        then it is built and measured exactly.
        """
        if not isinstance(data, Mapping):
            raise ValidationError({"mail": "must be an object"})
        checker = _Checker(data)
        for name in data:
            if name not in FIELDS:
                checker.problems[str(name)] = "unknown field"
        if "from" not in data or data["from"] is None:
            checker.problems["from"] = "missing"
        sender = checker.run("from", _one_address)
        to, cc, bcc, reply_to = (checker.run(n, _address_list, ()) for n in ("to", "cc", "bcc", "reply_to"))
        if not (to or cc or bcc) and not checker.has_problem("to", "cc", "bcc"):
            checker.problems["to"] = "missing: at least one recipient in to, cc or bcc"
        text = checker.run("text", _body)
        html = checker.run("html", _body)
        attachments = checker.run("attachments", _attachments, ())
        if not (text or html or attachments) and not checker.has_problem("text", "html", "attachments"):
            checker.problems["text"] = "missing: at least one of text, html or attachments"
        send_at = checker.run("send_at", _send_at)
        message_id = checker.run("message_id", _message_id)
        if message_id is None and sender is not None:
            id_domain = sender.domain if sender.domain.startswith("[") else _ascii_domain(sender.domain)
            message_id = make_msgid(domain=id_domain)
        now = datetime.now(UTC)
        # A scheduled mail is dated when it is due, not when it was enqueued.
        date = checker.run("date", _date) or format_datetime(max(now, send_at or now))
        mail = cls(
            from_address=cast(Address, sender),
            to=to,
            cc=cc,
            bcc=bcc,
            reply_to=reply_to,
            subject=checker.run("subject", _header_text, ""),
            text=text,
            html=html,
            attachments=attachments,
            headers=checker.run("headers", _headers, ()),
            metadata=MappingProxyType(checker.run("metadata", _metadata, {})),
            key=checker.run("key", _key),
            send_at=send_at,
            priority=checker.run("priority", _priority, "default"),
            route=checker.run("route", _route, DEFAULT_ROUTE),
            message_id=message_id or "",
            date=date,
        )
        if checker.problems:
            raise ValidationError(checker.problems)
        if not build and size_upper_bound(mail) <= max_bytes:
            return mail
        try:
            raw = build_message(mail)
        except (ValueError, TypeError, IndexError) as exc:  # a stdlib email limit we did not foresee
            raise ValidationError({"mail": f"cannot be written as MIME: {exc}"}) from exc
        if len(raw) > max_bytes:
            raise ValidationError({"size": f"too large: {len(raw)} bytes > limit {max_bytes}"})
        return dataclasses.replace(mail, raw=raw)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form; ``Mail.from_dict(mail.to_dict()) == mail``. Empty optional fields are left out."""
        out: dict[str, Any] = {"from": self.from_address.formatted()}
        lists = {"to": self.to, "cc": self.cc, "bcc": self.bcc, "reply_to": self.reply_to}
        out.update({name: [a.formatted() for a in items] for name, items in lists.items() if items})
        optional: dict[str, Any] = {
            "subject": self.subject,
            "text": self.text,
            "html": self.html,
            "attachments": [
                {
                    "filename": a.filename,
                    "content_type": a.content_type,
                    "content": base64.b64encode(a.content).decode("ascii"),
                }
                for a in self.attachments
            ],
            "headers": dict(self.headers),
            "metadata": dict(self.metadata),
            "key": self.key,
            "send_at": _iso_utc(self.send_at) if self.send_at is not None else None,
        }
        out.update({name: value for name, value in optional.items() if value})
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


class _Checker:
    """Runs one field's check, recording its problems under their field paths."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data
        self.problems: dict[str, str] = {}

    def run(self, name: str, check: Callable[[str, Any, dict[str, str]], T], default: Any = None) -> Any:
        value = self.data.get(name)
        if value is None:
            return default
        found: dict[str, str] = {}
        result = check(name, value, found)
        self.problems.update(found)
        return default if found else result

    def has_problem(self, *names: str) -> bool:
        return any(path.split("[")[0].split(".")[0] in names for path in self.problems)


def _one_address(path: str, value: Any, problems: dict[str, str]) -> Address | None:
    if not isinstance(value, str):
        problems[path] = "must be a string"
        return None
    try:
        return parse_address(value)
    except ValueError as exc:
        problems[path] = str(exc)
        return None


def _address_list(path: str, value: Any, problems: dict[str, str]) -> tuple[Address, ...]:
    if isinstance(value, str):
        address = _one_address(path, value, problems)
        return () if address is None else (address,)
    if not isinstance(value, list):
        problems[path] = "must be a string or a list of strings"
        return ()
    found = [_one_address(f"{path}[{index}]", item, problems) for index, item in enumerate(value)]
    return tuple(address for address in found if address is not None)


def _header_text(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str):
        problems[path] = "must be a string"
        return None
    problem = control_character_problem(value)
    if problem is not None:
        problems[path] = problem
    return value


def _body(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str):
        problems[path] = "must be a string"
    elif "\x00" in value:
        problems[path] = "contains a NUL character"
    return value or None


def _attachments(path: str, value: Any, problems: dict[str, str]) -> tuple[Attachment, ...]:
    if not isinstance(value, list):
        problems[path] = "must be a list of objects"
        return ()
    out: list[Attachment] = []
    for index, item in enumerate(value):
        item_path = f"{path}[{index}]"
        if not isinstance(item, Mapping):
            problems[item_path] = "must be an object with filename, content_type and content"
            continue
        before = len(problems)
        for name in item:
            if name not in ATTACHMENT_FIELDS:
                problems[f"{item_path}.{name}"] = "unknown field"
        for name in sorted(ATTACHMENT_FIELDS - set(item)):
            problems[f"{item_path}.{name}"] = "missing"
        filename = _filename(f"{item_path}.filename", item.get("filename"), problems)
        content_type = _content_type(f"{item_path}.content_type", item.get("content_type"), problems)
        content = _base64(f"{item_path}.content", item.get("content"), problems)
        if len(problems) == before and filename and content_type and content is not None:
            out.append(Attachment(filename=filename, content_type=content_type, content=content))
    return tuple(out)


def _filename(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems[path] = "must be a non-empty string"
        return None
    problem = control_character_problem(value)
    if problem is None and ("/" in value or "\\" in value):
        problem = "must be a bare file name (no '/' or '\\')"
    if problem is None and len(value) > MAX_FILENAME_LENGTH:
        problem = f"too long: more than {MAX_FILENAME_LENGTH} characters"
    if problem is not None:
        problems[path] = problem
    return value


def _content_type(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if value is None:
        return None
    match = _CONTENT_TYPE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        problems[path] = "must be 'type/subtype', e.g. application/pdf (no parameters)"
        return None
    if match.group(1).lower() in ("multipart", "message"):
        problems[path] = f"{match.group(1).lower()}/* is not allowed for an attachment"
        return None
    return match.group(0).lower()


def _base64(path: str, value: Any, problems: dict[str, str]) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, str):
        problems[path] = "must be a base64 string"
        return None
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        problems[path] = f"not valid base64: {exc}"
        return None


def _headers(path: str, value: Any, problems: dict[str, str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        problems[path] = "must be an object of header name to value"
        return ()
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, header_value in value.items():
        item_path = f"{path}.{name}"
        problem = custom_header_problem(name, header_value, seen)
        if problem is not None:
            problems[item_path] = problem
            continue
        seen.add(name.lower())
        out.append((name, header_value))
    return tuple(out)


def _metadata(path: str, value: Any, problems: dict[str, str]) -> dict[str, MetadataValue]:
    if not isinstance(value, Mapping):
        problems[path] = "must be an object"
        return {}
    for name, item in value.items():
        if not isinstance(name, str):
            problems[f"{path}.{name}"] = "name must be a string"
        elif item is not None and not isinstance(item, str | int | float | bool):
            problems[f"{path}.{name}"] = "must be a string, number, boolean or null"
        elif isinstance(item, float) and not math.isfinite(item):
            problems[f"{path}.{name}"] = "must be a finite number"
    if not problems:
        size = len(json.dumps(dict(value), separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
        if size > MAX_METADATA_BYTES:
            problems[path] = f"too large: {size} bytes > limit {MAX_METADATA_BYTES}"
    return dict(value)


def _key(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_LENGTH or not value.isprintable():
        problems[path] = f"must be 1 to {MAX_KEY_LENGTH} printable characters"
        return None
    return value


def _send_at(path: str, value: Any, problems: dict[str, str]) -> datetime | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, UTC)
        except (ValueError, OverflowError, OSError):
            problems[path] = "not a valid Unix time"
            return None
    if not isinstance(value, str):
        problems[path] = "must be an ISO 8601 datetime with timezone or Unix seconds"
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        problems[path] = "not an ISO 8601 datetime, e.g. 2026-11-27T16:00:00Z"
        return None
    if moment.tzinfo is None or moment.utcoffset() is None:
        problems[path] = "must include a timezone, e.g. 2026-11-27T16:00:00Z"
        return None
    return moment.astimezone(UTC)


def _priority(path: str, value: Any, problems: dict[str, str]) -> Priority | None:
    if value not in PRIORITIES:
        problems[path] = f"must be one of {', '.join(PRIORITIES)}"
        return None
    return cast(Priority, value)


def _route(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or not _ROUTE.fullmatch(value):
        problems[path] = "must be 1 to 64 characters from A-Z a-z 0-9 _ -"
        return None
    return value


def _message_id(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or len(value) > 250 or not _MESSAGE_ID.fullmatch(value):
        problems[path] = "must look like <unique@domain> (printable ASCII)"
        return None
    return value


def _date(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or control_character_problem(value) is not None:
        problems[path] = "must be an RFC 5322 date string"
        return None
    try:
        moment = parsedate_to_datetime(value)
    except (ValueError, TypeError):
        moment = None
    if moment is None or moment.tzinfo is None:
        problems[path] = "must be an RFC 5322 date with zone, e.g. Fri, 27 Nov 2026 16:00:00 +0000"
        return None
    return value


def _ascii_domain(domain: str) -> str:
    return domain.encode("idna").decode("ascii")


def _iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


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
