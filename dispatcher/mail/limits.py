"""The size limits of one mail, refused at enqueue with a field error (the README's limits table).

Why limits at all: the stdlib ``email`` package parses and folds a header value in time that grows faster
than its length (``_refold_parse_tree`` pops the head of a list per token, ``get_unstructured`` copies the
rest of the value per word), so an unbounded subject or header value costs the API and every attempt
at the worker seconds of CPU (issue 14: a 1 MB subject, 19 s per attempt). Each limit is checked on the
raw JSON value *before* the expensive checks run, so refusing an oversized field is cheap too.

The numbers are those real services document: recipients as SendGrid (1,000 to + cc + bcc per request;
Gmail in Google Workspace takes 2,000, Amazon SES and Postmark 50), attachments as Exchange Online (250
per message), a subject of one RFC 5322 line (998 characters; Exchange Online keeps 255, Postmark 2,000),
a custom header value as Amazon SES's add-header action (2,048 characters).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MAX_RECIPIENTS = 1000
"""Default of ``DISPATCH_MAX_RECIPIENTS``: addresses in to, cc and bcc together."""
MAX_REPLY_TO = 50
MAX_SUBJECT_CHARS = 998
MAX_HEADER_VALUE_CHARS = 2048
MAX_CUSTOM_HEADERS = 50
MAX_ATTACHMENTS = 250
MAX_DISPLAY_NAME_CHARS = 200

RECIPIENT_FIELDS = ("to", "cc", "bcc")


def count_addresses(value: Any) -> int:
    """How many addresses a raw ``to``/``cc``/``bcc``/``reply_to`` value names (a string is one)."""
    if isinstance(value, list):
        return len(value)
    return 0 if value is None else 1


def recipients_problem(data: Mapping[str, Any], limit: int | None) -> str | None:
    """Say what is wrong when to + cc + bcc name more than ``limit`` addresses (``None``: no limit)."""
    if limit is None:
        return None
    get = data.get  # RECIPIENT_FIELDS, spelt out: per mail
    count = count_addresses(get("to")) + count_addresses(get("cc")) + count_addresses(get("bcc"))
    if count <= limit:
        return None
    return (
        f"too many: {count} addresses in to, cc and bcc together, the limit is {limit} "
        "(DISPATCH_MAX_RECIPIENTS); send several mails"
    )


def too_many(what: str, count: int, limit: int) -> str:
    return f"too many {what}: {count}, the limit is {limit}"


def too_long(count: int, limit: int) -> str:
    return f"too long: {count} characters, the limit is {limit}"
