from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser, Parser
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.errors import ValidationError
from dispatcher.mail import fields
from dispatcher.mail.fields import MAX_LINE_OCTETS, custom_header_problem
from dispatcher.mail.message import Mail
from dispatcher.mail.mime import build_message, size_upper_bound, validated

PDF = b"%PDF-1.4\n\x00\xff binary \r\n bytes"


def mail(**extra: Any) -> Mail:
    data = {"from": "App <app@example.com>", "to": "ann@example.org", **extra}
    if not {"text", "html", "attachments"} & set(data):
        data["text"] = "hello"
    return validated(data)


def parse(raw: bytes) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(raw)
    assert isinstance(message, EmailMessage)
    return message


def assert_wire_safe(raw: bytes, *, seven_bit: bool = True) -> None:
    lines = raw.split(b"\r\n")
    assert lines[-1] == b""  # ends with CRLF
    assert all(b"\r" not in line and b"\n" not in line for line in lines)  # CRLF only, no bare CR or LF
    assert max(len(line) for line in lines) <= MAX_LINE_OCTETS
    if seven_bit:
        assert raw.isascii()


def test_text_only_is_text_plain_with_our_headers_in_order() -> None:
    m = mail(text="Hello Ann,\nsee you.\n", subject="Hi", cc="cc@example.org", reply_to="help@example.com")
    raw = build_message(m)
    assert_wire_safe(raw)
    parsed = parse(raw)
    assert parsed.get_content_type() == "text/plain"
    assert parsed.get_content() == "Hello Ann,\r\nsee you.\r\n"  # MIME canonical text: CRLF
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed["From"] == "App <app@example.com>"
    assert parsed["To"] == "ann@example.org"
    assert parsed["Cc"] == "cc@example.org"
    assert parsed["Reply-To"] == "help@example.com"
    assert parsed["Subject"] == "Hi"
    assert parsed["Date"] == m.date
    assert parsed["Message-ID"] == m.message_id
    assert parsed["MIME-Version"] == "1.0"
    names = [name for name, _ in parsed.items()]
    assert names[:8] == ["From", "To", "Cc", "Reply-To", "Subject", "Date", "Message-ID", "MIME-Version"]


def test_bcc_never_appears_in_the_message() -> None:
    m = mail(bcc=["hidden@example.net", "Secret Person <other@example.net>"])
    raw = build_message(m)
    assert b"hidden@example.net" not in raw and b"other@example.net" not in raw
    assert b"bcc" not in raw.lower()
    assert parse(raw)["Bcc"] is None
    assert m.envelope_recipients == ("ann@example.org", "hidden@example.net", "other@example.net")


def test_text_and_html_make_multipart_alternative() -> None:
    raw = build_message(mail(text="plain ✓", html="<p>rich ✓</p>"))
    assert_wire_safe(raw)
    parsed = parse(raw)
    assert parsed.get_content_type() == "multipart/alternative"
    plain, html = parsed.iter_parts()
    assert (plain.get_content_type(), plain.get_content()) == ("text/plain", "plain ✓\r\n")
    assert (html.get_content_type(), html.get_content()) == ("text/html", "<p>rich ✓</p>\r\n")
    assert plain["MIME-Version"] is None  # only at the top


def test_html_only_is_text_html() -> None:
    parsed = parse(build_message(mail(html="<b>hi</b>")))
    assert parsed.get_content_type() == "text/html"
    assert parsed.get_content() == "<b>hi</b>\r\n"


def test_attachments_make_multipart_mixed_around_the_body() -> None:
    m = mail(
        text="see attached",
        html="<p>see attached</p>",
        attachments=[
            {
                "filename": "report.pdf",
                "content_type": "application/pdf",
                "content": base64.b64encode(PDF).decode(),
            },
            {"filename": "naïve résumé.txt", "content_type": "text/plain", "content": "w7xi"},
        ],
    )
    raw = build_message(m)
    assert_wire_safe(raw)
    parsed = parse(raw)
    assert parsed.get_content_type() == "multipart/mixed"
    body, pdf, txt = parsed.iter_parts()
    assert body.get_content_type() == "multipart/alternative"
    assert [p.get_content_type() for p in body.iter_parts()] == ["text/plain", "text/html"]
    assert pdf.get_content_type() == "application/pdf"
    assert pdf.get_filename() == "report.pdf"
    assert pdf.get_content_disposition() == "attachment"
    assert pdf.get_content() == PDF
    assert txt.get_filename() == "naïve résumé.txt"
    assert txt.get_payload(decode=True) == "üb".encode()


def test_attachments_only() -> None:
    m = mail(
        attachments=[{"filename": "a.bin", "content_type": "application/octet-stream", "content": "AAEC"}]
    )
    parsed = parse(build_message(m))
    assert parsed.get_content_type() == "multipart/mixed"
    (only,) = parsed.iter_parts()
    assert only.get_content() == b"\x00\x01\x02"


def test_utf8_subject_and_display_name_are_rfc2047_encoded() -> None:
    raw = build_message(mail(subject="Grüße aus Köln", **{"from": "Zoë <zoe@example.com>"}))
    assert_wire_safe(raw)
    assert b"Subject: =?utf-8?b?R3LDvMOfZSBhdXMgS8O2bG4=?=\r\n" in raw
    parsed = parse(raw)
    assert parsed["Subject"] == "Grüße aus Köln"
    assert parsed["From"].addresses[0].display_name == "Zoë"


def test_mostly_non_ascii_text_goes_base64() -> None:
    parsed = parse(build_message(mail(text="日本語のテキストです")))
    assert parsed["Content-Transfer-Encoding"] == "base64"
    assert parsed.get_content() == "日本語のテキストです\r\n"


def test_long_lines_and_long_subjects_are_folded() -> None:
    raw = build_message(
        mail(text="word " * 1000 + "x" * 3000, subject="s" * 998, headers={"X-Long": "y" * 2000})
    )
    assert_wire_safe(raw)
    parsed = parse(raw)
    assert parsed["Subject"] == "s" * 998
    assert parsed["X-Long"] == "y" * 2000
    assert parsed.get_content() == "word " * 1000 + "x" * 3000 + "\r\n"


def test_custom_headers_come_after_ours() -> None:
    parsed = parse(build_message(mail(headers={"X-Campaign": "spring", "List-Id": "<news.example.com>"})))
    assert parsed["X-Campaign"] == "spring"
    assert parsed["List-Id"] == "<news.example.com>"
    names = [name for name, _ in parsed.items()]
    assert names.index("X-Campaign") > names.index("MIME-Version")


def test_utf8_addresses_use_utf8_headers() -> None:
    m = mail(to="用户 <用户@例子.中国>", subject="Grüße")
    raw = build_message(m)
    assert_wire_safe(raw, seven_bit=False)
    assert "To: 用户 <用户@例子.中国>".encode() in raw
    assert "Subject: Grüße".encode() in raw  # RFC 6532: UTF-8 as is
    parsed = Parser(policy=policy.default).parsestr(raw.decode("utf-8"))
    assert parsed["To"].addresses[0].addr_spec == "用户@例子.中国"
    assert parsed.get_content() == "hello\r\n"


def test_a_body_cannot_fake_a_boundary() -> None:
    m = mail(text="x", html="y")
    boundary = parse(build_message(m)).get_boundary()
    assert boundary is not None and boundary.startswith("=_")
    sneaky = validated(
        {**m.to_dict(), "text": f"--{boundary}\nContent-Type: text/html\n\n<evil>\n--{boundary}--"}
    )
    raw = build_message(sneaky)
    parsed = parse(raw)
    assert len(list(parsed.iter_parts())) == 2
    assert f"\r\n--{boundary}\r\nContent-Type: text/html\r\n\r\n<evil>".encode() not in raw


def test_same_mail_gives_identical_bytes() -> None:
    data = {
        "text": "t",
        "html": "<p>h</p>",
        "attachments": [{"filename": "a.bin", "content_type": "application/octet-stream", "content": "AAEC"}],
    }
    m = mail(**data)
    first = build_message(m)
    assert build_message(m) == first
    assert build_message(validated(json.loads(json.dumps(m.to_dict())))) == first
    other = mail(**data)  # a different mail: its own Message-ID and boundaries
    assert parse(build_message(other)).get_boundary() != parse(first).get_boundary()


def test_identical_bytes_in_another_process() -> None:
    m = mail(text="t", html="<p>h</p>", subject="Grüße", cc="c@example.org")
    script = (
        "import json, sys\n"
        "from dispatcher.mail.mime import build_message, validated\n"
        "sys.stdout.buffer.write(build_message(validated(json.loads(sys.stdin.read()))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(m.to_dict()).encode(),
        capture_output=True,
        check=True,
        timeout=60,
        env={"PYTHONHASHSEED": "12345"},
    )
    assert done.stdout == build_message(m)


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("X-Ok", "fine", None),
        ("X-Ok", "ünïcode is encoded", None),
        ("x-ok", "dup", "duplicate header name (names are case-insensitive)"),
        ("Received", "from evil", "reserved: dispatcher writes this header itself or does not allow it"),
        ("Sender", "x@example.com", "reserved: dispatcher writes this header itself or does not allow it"),
        ("Résumé", "v", "not a header field name (printable ASCII, no spaces or ':')"),
        ("X-Ok2", "a\nb", "contains a line break (CR/LF) — header injection"),
        ("X-Ok2", "a\x00b", "contains a NUL character"),
    ],
)
def test_custom_header_problem(name: str, value: str, problem: str | None) -> None:
    assert custom_header_problem(name, value, {"x-ok"} if name == "x-ok" else set()) == problem


@settings(max_examples=60, deadline=None)
@given(
    text=st.text(max_size=3000),
    html=st.one_of(st.none(), st.text(max_size=2000)),
    subject=st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), max_size=200),
    blob=st.binary(max_size=5000),
)
def test_the_size_bound_the_producer_trusts_is_never_below_the_real_size(
    text: str, html: str | None, subject: str, blob: bytes
) -> None:
    data: dict[str, object] = {"from": "Zoë <app@example.com>", "to": "ann@example.org", "subject": subject,
                               "text": text or "x", "attachments": [
                                   {"filename": "dätä.bin", "content_type": "application/octet-stream",
                                    "content": base64.b64encode(blob).decode()}]}  # fmt: skip
    if html:
        data["html"] = html
    try:
        mail = validated(data)
    except ValidationError:
        return  # not a mail (e.g. a NUL in the body): nothing to bound
    assert size_upper_bound(mail) >= len(build_message(mail))
    pinned = {**data, "message_id": mail.message_id, "date": mail.date}  # the same bytes again
    assert validated(pinned, build=False, max_bytes=len(mail.raw)).raw in (b"", mail.raw)


@pytest.mark.parametrize("text", ["ü" * 300, "Grüße aus Köln, " * 40, "日本語" * 100, "🎉 party " * 60])
def test_non_ascii_header_text_is_encoded_words_of_at_most_75_characters(text: str) -> None:
    """RFC 2047 §2: an encoded word is at most 75 characters (the email package's folders write 76 on a
    78-column line); they decode back to the text, in the subject and in a custom header."""
    raw = build_message(mail(subject=text[:998], headers={"X-Text": text[:2048]}))
    assert_wire_safe(raw)
    words = re.findall(rb"=\?utf-8\?[bq]\?[^?]*\?=", raw.split(b"\r\n\r\n", 1)[0])
    assert words and max(len(word) for word in words) <= 75
    parsed = parse(raw)
    assert (parsed["Subject"], parsed["X-Text"]) == (text[:998], text[:2048])


class _OddName(str):
    def lower(self) -> str:
        return "x-odd"


HEADER_NAMES: list[object] = [
    "X-Ok", "x-ok", "X-OK", "Received", "Sender", "Bcc", "content-type", "Content-Disposition", "Content-",
    "Résumé", "X Bad", "X-Bad:", "", ":", "X-\x7f", "Keywords", "List-Unsubscribe", "Message-ID", "X" * 101,
    "X" * 1000, 5, None, b"X-Bytes", _OddName("X-Odd"),
]  # fmt: skip
HEADER_VALUES: list[object] = [
    "fine", "ünïcode is encoded", "a\nb", "a\x00b", "=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "<a@example.com>",
    "x" * 990, "x" * 3000, "", 1, None,
]  # fmt: skip


def test_a_header_name_checked_before_gets_the_answer_it_got_then() -> None:
    """``custom_header_problem`` keeps the lower-cased form of each well-formed, unreserved name it saw;
    with a name kept (warm) it answers exactly what it answers having to check the name (cold)."""
    for name in HEADER_NAMES:
        for value in HEADER_VALUES:
            for seen in (set(), {"x-ok"}, {"x-odd"}):
                fields._NAMES.clear()
                cold = custom_header_problem(name, value, set(seen))
                custom_header_problem(name, "warm-up", set())
                warm = custom_header_problem(name, value, set(seen))
                assert warm == cold, (name, value, seen)
    assert "X" * 1000 not in fields._NAMES and b"X-Bytes" not in fields._NAMES
