"""The checks behind ``Mail.from_dict``, one per field of the JSON schema.

Each check takes the field's path, its value and the problems found so far; it records what is wrong under
the path ("to[2]", "attachments[0].content", "headers.X-Foo") and returns the value in its model form.
Text bound for a header line (subject, header values, file names, addresses, date) goes through
``header_text.header_text_problem``: no control characters, also not in what an RFC 2047 encoded word in it
decodes to. A clean pre-encoded word (``=?utf-8?q?Gr=C3=BC=C3=9Fe?=``) is accepted.
``Checker`` runs them and collects every problem, so one ``ValidationError`` names them all.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from email import policy as email_policy
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, Literal, TypeVar, cast

from dispatcher.mail import limits
from dispatcher.mail.addresses import Address, parse_address
from dispatcher.mail.header_text import header_text_problem

# Headers dispatcher writes itself (plus every Content-*) or trace/address headers it will not take from
# producers: a custom header with one of these names could contradict ours or smuggle recipients.
RESERVED_HEADERS = frozenset(
    {"from", "to", "cc", "bcc", "reply-to", "subject", "message-id", "date", "mime-version", "return-path",
     "received", "sender", "resent-from", "resent-to", "resent-cc", "resent-bcc", "resent-sender",
     "resent-date", "resent-message-id", "orig-date", "delivered-to"}
)  # fmt: skip

HEADER_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]+")  # RFC 5322 §3.6.8 ftext
MAX_LINE_OCTETS = 998  # RFC 5322 §2.1.1

MAX_METADATA_BYTES = 4096
MAX_KEY_LENGTH = 200
_MAX_DATE_CHARS = 100

Priority = Literal["high", "default", "bulk"]
PRIORITIES: tuple[Priority, ...] = ("high", "default", "bulk")
DEFAULT_ROUTE = "default"

MetadataValue = str | int | float | bool | None

#: What a producer may give instead of subject / text / html: a named template, rendered at enqueue by
#: ``dispatcher.mail.templates`` into an ordinary mail before ``Mail.from_dict`` sees it.
TEMPLATE_FIELDS = ("template", "data", "locale")


def uses_template(data: Mapping[str, Any]) -> bool:
    return "template" in data or "data" in data or "locale" in data  # TEMPLATE_FIELDS, spelt out: per mail


_ROUTE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_ATOM = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
"""RFC 2392's Content-ID, with or without its angle brackets; printable ASCII (no '<', '>' inside).
Looser than a msg-id (``<logo>`` without '@' is what mail clients and Django's users write)."""
_MESSAGE_ID = re.compile(rf"<{_DOT_ATOM}@(?:{_DOT_ATOM}|\[[\x21-\x5a\x5e-\x7e]*\])>")
"""RFC 5322 §3.6.4 msg-id: dot-atom-text "@" (dot-atom-text / no-fold-literal). Anything looser is written
by the email package as something else (``<a:b@x>`` becomes ``<a``), and the ledger is keyed on it."""

T = TypeVar("T")


class Checker:
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
        if not found:
            return result
        self.problems.update(found)
        return default

    def has_problem(self, *names: str) -> bool:
        if not self.problems:
            return False
        return any(path.split("[")[0].split(".")[0] in names for path in self.problems)


def one_address(path: str, value: Any, problems: dict[str, str]) -> Address | None:
    if not isinstance(value, str):
        problems[path] = "must be a string"
        return None
    try:
        return parse_address(value)
    except ValueError as exc:
        problems[path] = str(exc)
        return None


def address_list(path: str, value: Any, problems: dict[str, str]) -> tuple[Address, ...]:
    if isinstance(value, str):
        address = one_address(path, value, problems)
        return () if address is None else (address,)
    if not isinstance(value, list):
        problems[path] = "must be a string or a list of strings"
        return ()
    found: list[Address] = []
    for index, item in enumerate(value):
        try:  # the item's path ("to[3]") is written only for a problem
            found.append(parse_address(item))
        except ValueError as exc:
            problems[f"{path}[{index}]"] = str(exc)  # "must be a string" for a non-string, as one_address
    return tuple(found)


def subject(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if isinstance(value, str) and len(value) > limits.MAX_SUBJECT_CHARS:
        problems[path] = limits.too_long(len(value), limits.MAX_SUBJECT_CHARS)
        return None
    return header_text(path, value, problems)


def reply_to(path: str, value: Any, problems: dict[str, str]) -> tuple[Address, ...]:
    count = limits.count_addresses(value)
    if count > limits.MAX_REPLY_TO:
        problems[path] = limits.too_many("addresses", count, limits.MAX_REPLY_TO)
        return ()
    return address_list(path, value, problems)


def header_text(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str):
        problems[path] = "must be a string"
        return None
    problem = header_text_problem(value)
    if problem is not None:
        problems[path] = problem
    return value


def body(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str):
        problems[path] = "must be a string"
    elif "\x00" in value:
        problems[path] = "contains a NUL character"
    return value or None


def headers(path: str, value: Any, problems: dict[str, str]) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, Mapping):
        problems[path] = "must be an object of header name to value"
        return ()
    if len(value) > limits.MAX_CUSTOM_HEADERS:
        problems[path] = limits.too_many("headers", len(value), limits.MAX_CUSTOM_HEADERS)
        return ()
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name, header_value in value.items():
        problem = custom_header_problem(name, header_value, seen)
        if problem is not None:
            problems[f"{path}.{name}"] = problem
            continue
        seen.add(name.lower())
        out.append((name, header_value))
    return tuple(out)


def metadata(path: str, value: Any, problems: dict[str, str]) -> dict[str, MetadataValue]:
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


def key(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_KEY_LENGTH or not value.isprintable():
        problems[path] = f"must be 1 to {MAX_KEY_LENGTH} printable characters"
        return None
    return value


def send_at(path: str, value: Any, problems: dict[str, str]) -> datetime | None:
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


def priority(path: str, value: Any, problems: dict[str, str]) -> Priority | None:
    if value not in PRIORITIES:
        problems[path] = f"must be one of {', '.join(PRIORITIES)}"
        return None
    return cast(Priority, value)


def route(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or not _ROUTE.fullmatch(value):
        problems[path] = "must be 1 to 64 characters from A-Z a-z 0-9 _ -"
        return None
    return value


def message_id(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or len(value) > 250 or not _MESSAGE_ID.fullmatch(value) or "=?" in value:
        problems[path] = "must look like <unique@domain> (printable ASCII)"
        return None
    return value


def date(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if not isinstance(value, str) or len(value) > _MAX_DATE_CHARS or header_text_problem(value) is not None:
        problems[path] = "must be an RFC 5322 date string"
        return None
    moment = _parsed_date(value)
    # RFC 5322 §3.3: "-0000" is UTC with the local zone unknown (what formatdate() writes, Django's
    # default); the email package reads it as a naive time, which is not a missing zone.
    if moment is None or (moment.tzinfo is None and not value.rstrip().endswith("-0000")):
        problems[path] = "must be an RFC 5322 date with zone, e.g. Fri, 27 Nov 2026 16:00:00 +0000"
        return None
    return value


@functools.lru_cache(maxsize=64)  # mails enqueued together share their Date
def _parsed_date(value: str) -> datetime | None:
    try:
        return parsedate_to_datetime(value)
    except (ValueError, TypeError):
        return None


def ascii_domain(domain: str) -> str:
    """The IDNA form of a validated domain (an ASCII name is its own: the codec's fast path, skipped)."""
    return domain if domain.isascii() else domain.encode("idna").decode("ascii")


def date_header(due: datetime | None) -> str:
    """The Date of a mail validated now and due at ``due`` (``None``: now): ``format_datetime`` of the
    later of the two in UTC. RFC 5322 keeps whole seconds, so the mails validated within one second share
    one string (a few µs of ``strftime`` each, otherwise)."""
    second = math.floor(time.time())
    if due is not None:
        second = max(second, math.floor(due.timestamp()))
    return _date_of_second(second)


@functools.lru_cache(maxsize=8)
def _date_of_second(second: int) -> str:
    return format_datetime(datetime.fromtimestamp(second, UTC))


def iso_utc(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def custom_header_problem(name: object, value: object, seen: set[str]) -> str | None:
    """What is wrong with one custom header (``seen``: lower-cased names already accepted), or ``None``.

    The value must survive the email package under both policies :func:`build_message` may use:
    no parse defects (a structured header must parse) and no folded line over 998 octets.
    """
    if not isinstance(name, str):
        return "not a header field name (printable ASCII, no spaces or ':')"
    lowered = _NAMES.get(name) if type(name) is str else None  # mails enqueued together share their names
    if lowered is None:
        if not HEADER_NAME.fullmatch(name):
            return "not a header field name (printable ASCII, no spaces or ':')"
        lowered = name.lower()
        if lowered in RESERVED_HEADERS or lowered.startswith("content-"):
            return "reserved: dispatcher writes this header itself or does not allow it"
        if type(name) is str and len(name) <= _NAME_KEPT_CHARS:
            if len(_NAMES) >= _NAMES_MAX:
                _NAMES.clear()
            _NAMES[name] = lowered
    if lowered in seen:
        return "duplicate header name (names are case-insensitive)"
    if not isinstance(value, str):
        return "must be a string"
    if len(value) > limits.MAX_HEADER_VALUE_CHARS:
        return limits.too_long(len(value), limits.MAX_HEADER_VALUE_CHARS)
    if value.isascii() and value.isprintable() and "=?" not in value:  # nothing to decode or encode
        if lowered not in _STRUCTURED and len(name) + 2 + len(value) <= MAX_LINE_OCTETS:
            return None  # printable ASCII in an unstructured header, short enough never to need folding
    else:
        problem = header_text_problem(value)
        if problem is not None:
            return problem
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


_NAMES: dict[str, str] = {}
"""Custom header names found to be well-formed and not reserved, each with its lower-cased form (what
``custom_header_problem`` finds of a name depends on nothing else). Emptied when ``_NAMES_MAX`` are held."""
_NAMES_MAX = 256
_NAME_KEPT_CHARS = 100

_STRUCTURED: Mapping[str, Any] = email_policy.SMTP.header_factory.registry  # type: ignore[attr-defined]
"""The email package's registry of the header names it parses (address lists, dates, MIME fields), by
lower-cased name: such a header never takes the fast path."""


def unencodable_text(data: Mapping[str, Any]) -> dict[str, str]:
    """Every string in ``data`` (keys too, at any depth) that UTF-8 cannot encode — a lone surrogate such
    as ``"\\udce9"``, which a JSON decoder lets through — by field path (``metadata.k``, ``to[0]``).

    A mail of JSON values that encodes as UTF-8 in one ``json.dumps`` has none (a few C calls, whatever
    its size); only otherwise is every value visited to name the fields.
    """
    if _small_ascii_mail(data):
        return {}  # ASCII text is UTF-8 as it is
    with contextlib.suppress(TypeError, ValueError):  # not JSON values (Python API): look at each one
        json.dumps(data, ensure_ascii=False).encode("utf-8")
        return {}
    problems: dict[str, str] = {}
    todo: list[tuple[str, Any]] = [(str(key), value) for key, value in data.items()]
    for key in data:
        if isinstance(key, str) and _unencodable(key):
            problems[repr(key)] = "field name is not valid Unicode text (a lone surrogate)"
    while todo:
        path, value = todo.pop()
        if isinstance(value, str):
            if _unencodable(value):
                problems[path] = "not valid Unicode text (a lone surrogate, e.g. \\udce9)"
        elif isinstance(value, Mapping):
            todo.extend((f"{path}.{key}", item) for key, item in value.items())
            problems.update({f"{path}.{key!r}": "name is not valid Unicode text (a lone surrogate)"
                             for key in value if isinstance(key, str) and _unencodable(key)})  # fmt: skip
        elif isinstance(value, list | tuple):
            todo.extend((f"{path}[{index}]", item) for index, item in enumerate(value))
    return problems


_SMALL = 8
"""Items of a list or object ``_small_ascii_mail`` looks at, at most (beyond, one ``json.dumps`` is
cheaper than a Python loop, and a huge list is refused by its limit later, for the price of a small mail)."""


def _small_ascii_mail(data: Mapping[str, Any]) -> bool:
    """Whether ``data`` is a flat mail of ASCII text (keys too; ``str.isascii`` costs nothing in CPython):
    strings, numbers, and lists or objects of at most ``_SMALL`` of them. False says nothing: look closer.
    Exact types only (``type(x) is str``, cheaper than ``isinstance``): a subclass, a bool, is looked at
    closer."""
    for name, value in data.items():
        if type(name) is not str or not name.isascii():
            return False
        kind = type(value)
        if kind is str:
            if not value.isascii():
                return False
        elif kind is list:
            if len(value) > _SMALL:
                return False
            for item in value:
                if type(item) is not str or not item.isascii():
                    return False
        elif kind is dict:
            if len(value) > _SMALL:
                return False
            for key, item in value.items():
                if type(key) is not str or not key.isascii():
                    return False
                item_kind = type(item)
                if item_kind is str:
                    if not item.isascii():
                        return False
                elif item is not None and item_kind is not int and item_kind is not float:
                    return False
        elif value is not None and kind is not int and kind is not float:
            return False
    return True


def _unencodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False
