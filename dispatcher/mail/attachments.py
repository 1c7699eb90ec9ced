"""The ``attachments`` field: each file part's checks, and ``Attachment``, its model form.

A part has a ``filename`` (a bare name; a related part may go without), a ``content_type`` (``type/subtype``,
never multipart/* or message/*), base64 ``content``, and optionally a ``content_id`` (then ``inline`` by
default: an image the HTML shows through ``cid:``), a ``disposition`` and, for text/*, a ``charset``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dispatcher.mail import limits
from dispatcher.mail.header_text import header_text_problem

ATTACHMENT_FIELDS = frozenset({"filename", "content_type", "content", "content_id", "disposition", "charset"})
ATTACHMENT_REQUIRED = frozenset({"content_type", "content"})
DISPOSITIONS = ("attachment", "inline")
_MIME_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(rf"({_MIME_TOKEN})/({_MIME_TOKEN})")
_CONTENT_ID = re.compile(r"<?([\x21-\x3b\x3d\x3f-\x7e]{1,200})>?")
_CHARSET = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,39}")
MAX_FILENAME_LENGTH = 255


@dataclass(frozen=True, slots=True)
class Attachment:
    """A file part. With a ``content_id`` and the ``inline`` disposition it is a related part (an image an
    HTML body shows through ``cid:``); ``charset`` is the text/* part's charset parameter."""

    filename: str | None
    content_type: str
    content: bytes
    content_id: str | None = None
    disposition: str = "attachment"
    charset: str | None = None

    @property
    def is_related(self) -> bool:
        return self.content_id is not None and self.disposition == "inline"

    @property
    def maintype(self) -> str:
        return self.content_type.partition("/")[0]

    @property
    def subtype(self) -> str:
        return self.content_type.partition("/")[2]


def attachments(path: str, value: Any, problems: dict[str, str]) -> tuple[Attachment, ...]:
    if not isinstance(value, list):
        problems[path] = "must be a list of objects"
        return ()
    if len(value) > limits.MAX_ATTACHMENTS:
        problems[path] = limits.too_many("attachments", len(value), limits.MAX_ATTACHMENTS)
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
        given = {name for name, item_value in item.items() if item_value is not None}
        for name in sorted(ATTACHMENT_REQUIRED - given):
            problems[f"{item_path}.{name}"] = "missing"
        if "filename" not in given and "content_id" not in given:
            problems[f"{item_path}.filename"] = "missing (only a part with a content_id may go without)"
        filename = _filename(f"{item_path}.filename", item.get("filename"), problems)
        content_type = _content_type(f"{item_path}.content_type", item.get("content_type"), problems)
        content = _base64(f"{item_path}.content", item.get("content"), problems)
        content_id = _content_id(f"{item_path}.content_id", item.get("content_id"), problems)
        disposition = _disposition(f"{item_path}.disposition", item.get("disposition"), content_id, problems)
        charset = _charset(f"{item_path}.charset", item.get("charset"), content_type, problems)
        if len(problems) == before and content_type and content is not None:
            out.append(
                Attachment(
                    filename=filename,
                    content_type=content_type,
                    content=content,
                    content_id=content_id,
                    disposition=disposition,
                    charset=charset,
                )
            )
    return tuple(out)


def _content_id(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if value is None:
        return None
    match = _CONTENT_ID.fullmatch(value) if isinstance(value, str) else None
    if match is None or value.startswith("<") != value.endswith(">"):
        problems[path] = "must be 1 to 200 printable ASCII characters, e.g. logo@example.com or <logo>"
        return None
    return f"<{match.group(1)}>"


def _disposition(path: str, value: Any, content_id: str | None, problems: dict[str, str]) -> str:
    if value is None:
        return "inline" if content_id is not None else "attachment"
    if value not in DISPOSITIONS:
        problems[path] = f"must be one of {', '.join(DISPOSITIONS)}"
        return "attachment"
    return str(value)


def _charset(path: str, value: Any, content_type: str | None, problems: dict[str, str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _CHARSET.fullmatch(value):
        problems[path] = "must be a charset name, e.g. utf-8"
        return None
    if content_type is not None and not content_type.startswith("text/"):
        problems[path] = "only a text/* part has a charset"
        return None
    return value.lower()


def _filename(path: str, value: Any, problems: dict[str, str]) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        problems[path] = "must be a non-empty string"
        return None
    problem = limits.too_long(len(value), MAX_FILENAME_LENGTH) if len(value) > MAX_FILENAME_LENGTH else None
    problem = problem or header_text_problem(value)
    if problem is None and ("/" in value or "\\" in value):
        problem = "must be a bare file name (no '/' or '\\')"
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
