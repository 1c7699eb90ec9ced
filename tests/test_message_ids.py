"""A Message-ID is written exactly as given, or refused: the ledger and idempotency are keyed on it."""

from __future__ import annotations

import pytest

from dispatcher.errors import ValidationError
from dispatcher.mail.mime import build_message, validated

BASE = {"from": "a@example.com", "to": "b@example.org", "text": "x"}


def written_message_id(raw: bytes) -> bytes:
    return next(line for line in raw.split(b"\r\n") if line.lower().startswith(b"message-id:"))


@pytest.mark.parametrize(
    "message_id",
    ["<a.b@example.com>", "<x+y=z/w@host.example>", "<a@[192.0.2.1]>", "<{weird}~'#@x.y>", "<1.2.3@a-b.c>"],
)
def test_a_valid_message_id_is_written_as_given(message_id: str) -> None:
    raw = build_message(validated({**BASE, "message_id": message_id}))
    assert written_message_id(raw) == b"Message-ID: " + message_id.encode()


@pytest.mark.parametrize(
    "message_id",
    ["<a:b@example.com>", "<a(b)@example.com>", '<a"b@example.com>', "<a,b@example.com>", "<a@b@c>",
     "<a;b@x.com>", "<a\\b@x.com>", "<.a@x.com>", "<a..b@x.com>", "<a.@x.com>", "<a@>", "<@x.com>",
     "a@x.com", "<a b@x.com>", "<a@[x]y>"],
)  # fmt: skip
def test_one_the_email_package_would_rewrite_is_refused(message_id: str) -> None:
    with pytest.raises(ValidationError, match="message_id"):
        validated({**BASE, "message_id": message_id})
