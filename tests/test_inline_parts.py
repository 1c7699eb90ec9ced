"""Attachments that are more than files (issue 16): inline images referenced by ``cid:``, a text part's
charset, an explicit disposition — validated field by field and written as the MIME tree they promise."""

from __future__ import annotations

import base64
import email
from email import policy
from email.message import EmailMessage
from typing import Any

import pytest

from dispatcher.errors import ValidationError
from dispatcher.mail.message import Mail
from dispatcher.mail.mime import validated


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def mail(**extra: Any) -> dict[str, Any]:
    return {"from": "app@example.com", "to": "ann@example.org", "subject": "s", **extra}


LOGO = {"content_type": "image/png", "content": b64(b"\x89PNG logo"), "content_id": "<logo@example.com>"}
PDF = {"filename": "a.pdf", "content_type": "application/pdf", "content": b64(b"%PDF-1.4")}


def tree(raw: bytes) -> list[tuple[str, str | None, str | None, str | None]]:
    parsed = email.message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return [
        (p.get_content_type(), p.get_content_disposition(), p["Content-ID"], p.get_param("charset"))
        for p in parsed.walk()
    ]


def test_text_html_and_an_inline_image_are_one_related_part_holding_the_alternative() -> None:
    raw = validated(mail(text="hi", html="<img src='cid:logo@example.com'>", attachments=[LOGO])).raw
    assert tree(raw) == [
        ("multipart/related", None, None, None),
        ("multipart/alternative", None, None, None),
        ("text/plain", None, None, "utf-8"),
        ("text/html", None, None, "utf-8"),
        ("image/png", "inline", "<logo@example.com>", None),
    ]


def test_attachments_go_around_the_related_part_in_a_mixed_one() -> None:
    raw = validated(mail(html="<img src='cid:logo@example.com'>", attachments=[PDF, LOGO])).raw
    assert tree(raw) == [
        ("multipart/mixed", None, None, None),
        ("multipart/related", None, None, None),
        ("text/html", None, None, "utf-8"),
        ("image/png", "inline", "<logo@example.com>", None),
        ("application/pdf", "attachment", None, None),
    ]


def test_a_text_attachment_keeps_its_charset_and_bytes() -> None:
    note = {"filename": "n.txt", "content_type": "text/plain", "content": b64("grüß".encode())}
    note["charset"] = "UTF-8"
    raw = validated(mail(text="hi", attachments=[note])).raw
    parsed = email.message_from_bytes(raw, policy=policy.default)
    part = list(parsed.walk())[-1]
    assert (part.get_content_type(), part.get_param("charset"), part.get_filename()) == (
        "text/plain", "utf-8", "n.txt"
    )  # fmt: skip
    assert part.get_payload(decode=True) == "grüß".encode()


def test_content_id_without_brackets_is_stored_with_them_and_round_trips() -> None:
    first = Mail.from_dict(mail(html="x", attachments=[{**LOGO, "content_id": "logo"}]))
    assert first.attachments[0].content_id == "<logo>"
    assert first.attachments[0].disposition == "inline"
    assert Mail.from_dict(first.to_dict()) == first


def test_an_inline_part_with_disposition_attachment_is_a_plain_attachment_with_a_content_id() -> None:
    part = {**LOGO, "disposition": "attachment", "filename": "l.png"}
    raw = validated(mail(text="hi", attachments=[part])).raw
    assert tree(raw)[0][0] == "multipart/mixed"
    assert tree(raw)[-1] == ("image/png", "attachment", "<logo@example.com>", None)


@pytest.mark.parametrize(
    ("attachment", "field", "problem"),
    [
        ({"content_type": "image/png", "content": b64(b"x")}, "filename", "missing"),
        ({**LOGO, "content_id": "<a b>"}, "content_id", "printable ASCII"),
        ({**LOGO, "content_id": "<a\r\nBcc: x@evil.example>"}, "content_id", "printable ASCII"),
        ({**LOGO, "content_id": "<half"}, "content_id", "printable ASCII"),
        ({**LOGO, "disposition": "form-data"}, "disposition", "attachment, inline"),
        ({**LOGO, "charset": "utf-8"}, "charset", "only a text/* part"),
        ({**PDF, "content_type": "text/plain", "charset": "utf 8"}, "charset", "charset name"),
    ],
)
def test_bad_part_fields_are_named(attachment: dict[str, Any], field: str, problem: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Mail.from_dict(mail(text="hi", attachments=[attachment]))
    assert problem in caught.value.problems[f"attachments[0].{field}"]


def test_plain_attachments_are_written_as_before() -> None:
    """The new fields are optional: an old mail's dict and bytes are unchanged by them."""
    data = mail(text="hi", attachments=[PDF], message_id="<fixed@example.com>")
    built = validated(data)
    assert built.to_dict()["attachments"] == [PDF]
    assert b"Content-Disposition: attachment; filename=\"a.pdf\"\r\n\r\nJVBERi0xLjQ=" in built.raw


def test_an_attachment_with_a_null_filename_is_refused_not_dropped() -> None:
    """Before issue 16 a ``"filename": null`` attachment passed validation and was silently left out of
    the message: the mail went without it."""
    with pytest.raises(ValidationError) as caught:
        Mail.from_dict(mail(text="hi", attachments=[{**PDF, "filename": None}]))
    assert caught.value.problems["attachments[0].filename"].startswith("missing")


def test_a_date_in_utc_with_no_local_zone_is_an_rfc_5322_date() -> None:
    """``-0000`` (RFC 5322 §3.3; what ``email.utils.formatdate()`` and so Django write) was refused as a
    date without a zone."""
    built = validated(mail(text="hi", date="Fri, 27 Nov 2026 16:00:00 -0000"))
    assert b"\r\nDate: Fri, 27 Nov 2026 16:00:00 -0000\r\n" in built.raw
