from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.errors import ValidationError
from dispatcher.mail import fields
from dispatcher.mail.addresses import Address
from dispatcher.mail.attachments import Attachment
from dispatcher.mail.fields import PRIORITIES
from dispatcher.mail.message import DEFAULT_MAX_BYTES
from dispatcher.mail.mime import validated


def minimal(**extra: Any) -> dict[str, Any]:
    return {"from": "app@example.com", "to": "ann@example.org", "text": "hello", **extra}


def problems_of(data: Any, **kwargs: Any) -> dict[str, str]:
    with pytest.raises(ValidationError) as caught:
        validated(data, **kwargs)
    return caught.value.problems


def test_minimal_mail_gets_defaults_and_a_generated_id_and_date() -> None:
    before = datetime.now(UTC).replace(microsecond=0)
    mail = validated(minimal())
    assert mail.from_address == Address("", "app@example.com")
    assert mail.to == (Address("", "ann@example.org"),)
    assert (mail.cc, mail.bcc, mail.reply_to, mail.attachments, mail.headers) == ((), (), (), (), ())
    assert (mail.subject, mail.text, mail.html) == ("", "hello", None)
    assert (mail.priority, mail.route, mail.key, mail.send_at) == ("default", "default", None, None)
    assert dict(mail.metadata) == {}
    assert mail.message_id.startswith("<") and mail.message_id.endswith("@example.com>")
    assert before <= parsedate_to_datetime(mail.date) <= datetime.now(UTC)
    assert PRIORITIES == ("high", "default", "bulk")
    assert DEFAULT_MAX_BYTES == 25 * 1024 * 1024


def test_each_validation_generates_a_fresh_message_id() -> None:
    assert validated(minimal()).message_id != validated(minimal()).message_id


def test_full_mail_round_trips_through_json() -> None:
    data = {
        "from": "Zoë Q <zoe@example.com>",
        "to": ["ann@example.org", '"Lee, Bob" <bob@example.org>'],
        "cc": "carol@example.net",
        "bcc": ["dave@example.net"],
        "reply_to": "help@example.com",
        "subject": "Grüße",
        "text": "plain",
        "html": "<p>html</p>",
        "attachments": [
            {
                "filename": "r.pdf",
                "content_type": "Application/PDF",
                "content": base64.b64encode(b"%PDF").decode(),
            }
        ],
        "headers": {"X-Campaign": "spring", "List-Unsubscribe": "<https://example.com/u>"},
        "metadata": {"user_id": 7, "ratio": 0.5, "vip": True, "note": None, "tag": "x"},
        "key": "order-42/receipt",
        "send_at": "2026-11-27T17:00:00.250000+01:00",
        "priority": "bulk",
        "route": "eu_ses-2",
    }
    mail = validated(data)
    assert mail.attachments == (Attachment("r.pdf", "application/pdf", b"%PDF"),)
    assert mail.send_at == datetime(2026, 11, 27, 16, 0, 0, 250000, tzinfo=UTC)
    stored = json.loads(json.dumps(mail.to_dict()))
    assert stored["send_at"] == "2026-11-27T16:00:00.250000Z"
    assert stored["bcc"] == ["dave@example.net"]
    assert stored["to"] == ["ann@example.org", '"Lee, Bob" <bob@example.org>']
    again = validated(stored)
    assert again == mail
    assert (again.message_id, again.date) == (mail.message_id, mail.date)
    assert hash(again) == hash(mail)


def test_to_dict_of_minimal_mail() -> None:
    mail = validated(minimal())
    assert mail.to_dict() == {
        "from": "app@example.com",
        "to": ["ann@example.org"],
        "text": "hello",
        "priority": "default",
        "route": "default",
        "message_id": mail.message_id,
        "date": mail.date,
    }


def test_send_at_as_unix_seconds_is_normalised_to_iso_utc() -> None:
    mail = validated(minimal(send_at=1_800_000_000))
    assert mail.send_at == datetime(2027, 1, 15, 8, 0, tzinfo=UTC)
    assert mail.to_dict()["send_at"] == "2027-01-15T08:00:00Z"


def test_a_scheduled_mail_is_dated_when_due() -> None:
    mail = validated(minimal(send_at="2099-01-01T00:00:00Z"))
    assert mail.date == "Thu, 01 Jan 2099 00:00:00 +0000"


def test_given_message_id_and_date_are_kept() -> None:
    mail = validated(minimal(message_id="<abc.1@example.com>", date="Fri, 27 Nov 2026 16:00:00 +0000"))
    assert (mail.message_id, mail.date) == ("<abc.1@example.com>", "Fri, 27 Nov 2026 16:00:00 +0000")


def test_envelope_is_to_cc_bcc_without_duplicates() -> None:
    mail = validated(
        minimal(
            to=["Ann <Ann@Example.org>", "bob@example.net"],
            cc=["ann@example.org", "carol@example.org"],
            bcc=["BOB@example.net", "dave@sub.example.org"],
        )
    )
    assert mail.envelope_sender == "app@example.com"
    assert mail.envelope_recipients == (
        "Ann@Example.org",
        "bob@example.net",
        "carol@example.org",
        "dave@sub.example.org",
    )
    assert mail.recipient_domains == ("example.org", "example.net", "sub.example.org")
    assert not mail.needs_smtputf8


def test_utf8_addresses_are_accepted_and_flagged() -> None:
    assert validated(minimal(to="用户@例子.中国")).needs_smtputf8
    assert validated(minimal(bcc="josé@example.org")).needs_smtputf8
    assert validated(minimal(**{"from": "josé@exämple.com"})).needs_smtputf8
    assert validated(minimal(reply_to="josé@example.org")).needs_smtputf8
    assert not validated(minimal(to="Zoë <zoe@example.org>")).needs_smtputf8


def test_message_id_of_an_idn_sender_uses_the_ascii_domain() -> None:
    mail = validated(minimal(**{"from": "app@exämple.com"}))
    assert mail.message_id.endswith("@xn--exmple-cua.com>")


@pytest.mark.parametrize(
    ("extra", "path", "problem"),
    [
        (
            {"subject": "Hi\r\nBcc: victim@example.org"},
            "subject",
            "contains a line break (CR/LF) — header injection",
        ),
        ({"subject": 5}, "subject", "must be a string"),
        ({"from": "app.example.com"}, "from", "not an email address: no '@'"),
        ({"from": ["app@example.com"]}, "from", "must be a string"),
        ({"to": ["a@example.org", "b@example.org", "nobody"]}, "to[2]", "not an email address: no '@'"),
        ({"to": 7}, "to", "must be a string or a list of strings"),
        ({"cc": [None]}, "cc[0]", "must be a string"),
        ({"bogus": 1}, "bogus", "unknown field"),
        (
            {"headers": {"X-Ok": "fine\r\nBcc: victim@example.org"}},
            "headers.X-Ok",
            "contains a line break (CR/LF) — header injection",
        ),
        (
            {"headers": {"Bcc": "victim@example.org"}},
            "headers.Bcc",
            "reserved: dispatcher writes this header itself or does not allow it",
        ),
        (
            {"headers": {"content-type": "text/html"}},
            "headers.content-type",
            "reserved: dispatcher writes this header itself or does not allow it",
        ),
        (
            {"headers": {"Content-Disposition": "inline"}},
            "headers.Content-Disposition",
            "reserved: dispatcher writes this header itself or does not allow it",
        ),
        (
            {"headers": {"X Bad": "v"}},
            "headers.X Bad",
            "not a header field name (printable ASCII, no spaces or ':')",
        ),
        (
            {"headers": {"X-Bad:": "v"}},
            "headers.X-Bad:",
            "not a header field name (printable ASCII, no spaces or ':')",
        ),
        (
            {"headers": {"X-A": "1", "x-a": "2"}},
            "headers.x-a",
            "duplicate header name (names are case-insensitive)",
        ),
        ({"headers": {"X-A": 1}}, "headers.X-A", "must be a string"),
        ({"headers": ["X-A: 1"]}, "headers", "must be an object of header name to value"),
        (
            {"attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "not base64!"}]},
            "attachments[0].content",
            "not valid base64: Only base64 data is allowed",
        ),
        (
            {"attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "YWJj\n"}]},
            "attachments[0].content",
            "not valid base64: Only base64 data is allowed",
        ),
        (
            {"attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "YWJ"}]},
            "attachments[0].content",
            "not valid base64: Incorrect padding",
        ),
        (
            {"attachments": [{"filename": "../etc/passwd", "content_type": "text/plain", "content": ""}]},
            "attachments[0].filename",
            "must be a bare file name (no '/' or '\\')",
        ),
        (
            {"attachments": [{"filename": "a.txt", "content_type": "text", "content": ""}]},
            "attachments[0].content_type",
            "must be 'type/subtype', e.g. application/pdf (no parameters)",
        ),
        (
            {"attachments": [{"filename": "a.txt", "content_type": "multipart/mixed", "content": ""}]},
            "attachments[0].content_type",
            "multipart/* is not allowed for an attachment",
        ),
        (
            {"attachments": [{"filename": "a.txt", "content_type": "text/plain"}]},
            "attachments[0].content",
            "missing",
        ),
        (
            {"attachments": [{"filename": "a", "content_type": "text/plain", "content": "", "size": 1}]},
            "attachments[0].size",
            "unknown field",
        ),
        ({"attachments": "a.txt"}, "attachments", "must be a list of objects"),
        ({"send_at": "2026-11-27T16:00:00"}, "send_at", "must include a timezone, e.g. 2026-11-27T16:00:00Z"),
        ({"send_at": "next tuesday"}, "send_at", "not an ISO 8601 datetime, e.g. 2026-11-27T16:00:00Z"),
        ({"send_at": 1e300}, "send_at", "not a valid Unix time"),
        ({"send_at": True}, "send_at", "must be an ISO 8601 datetime with timezone or Unix seconds"),
        ({"priority": "urgent"}, "priority", "must be one of high, default, bulk"),
        ({"route": "eu west"}, "route", "must be 1 to 64 characters from A-Z a-z 0-9 _ -"),
        ({"route": "r" * 65}, "route", "must be 1 to 64 characters from A-Z a-z 0-9 _ -"),
        ({"route": "ok\n"}, "route", "must be 1 to 64 characters from A-Z a-z 0-9 _ -"),
        ({"key": ""}, "key", "must be 1 to 200 printable characters"),
        ({"key": "k" * 201}, "key", "must be 1 to 200 printable characters"),
        ({"key": "a\nb"}, "key", "must be 1 to 200 printable characters"),
        ({"metadata": {"user": [1, 2]}}, "metadata.user", "must be a string, number, boolean or null"),
        ({"metadata": {"big": "x" * 5000}}, "metadata", "too large: 5010 bytes > limit 4096"),
        ({"metadata": {"nan": float("nan")}}, "metadata.nan", "must be a finite number"),
        (
            {"message_id": "no-angle@example.com"},
            "message_id",
            "must look like <unique@domain> (printable ASCII)",
        ),
        (
            {"date": "yesterday"},
            "date",
            "must be an RFC 5322 date with zone, e.g. Fri, 27 Nov 2026 16:00:00 +0000",
        ),
        ({"text": "a\x00b"}, "text", "contains a NUL character"),
        ({"html": ["<p>"]}, "html", "must be a string"),
    ],
)
def test_bad_field_gives_path_and_problem(extra: dict[str, Any], path: str, problem: str) -> None:
    assert problems_of(minimal(**extra)) == {path: problem}


def test_missing_sender_recipients_and_content() -> None:
    assert problems_of({}) == {
        "from": "missing",
        "to": "missing: at least one recipient in to, cc or bcc",
        "text": "missing: at least one of text, html or attachments",
    }
    assert problems_of(minimal(to=[]))["to"] == "missing: at least one recipient in to, cc or bcc"


def test_bcc_alone_is_enough_and_attachments_alone_are_enough() -> None:
    data = {
        "from": "app@example.com",
        "bcc": "ann@example.org",
        "attachments": [{"filename": "a.bin", "content_type": "application/octet-stream", "content": "AAE="}],
    }
    assert validated(data).envelope_recipients == ("ann@example.org",)


def test_all_problems_are_collected_together() -> None:
    problems = problems_of(
        {
            "from": "nobody",
            "to": ["ok@example.org", "Ann <ann@example.org"],
            "subject": "x\ny",
            "headers": {"Subject": "dup"},
            "priority": "low",
            "route": "",
            "key": 5,
            "send_at": "soon",
            "colour": "blue",
            "text": "body",
        }
    )
    assert set(problems) == {
        "from", "to[1]", "subject", "headers.Subject", "priority", "route", "key", "send_at", "colour",
    }  # fmt: skip


def test_oversize_mail_is_refused_with_its_size() -> None:
    payload = base64.b64encode(b"\x00" * 3000).decode()
    data = minimal(
        attachments=[{"filename": "z.bin", "content_type": "application/octet-stream", "content": payload}],
        message_id="<fixed.size@example.com>",
        date="Fri, 27 Nov 2026 16:00:00 +0000",
    )
    problems = problems_of(data, max_bytes=2000)
    assert list(problems) == ["size"]
    size = int(problems["size"].split()[2])
    assert size > 4000
    assert problems["size"] == f"too large: {size} bytes > limit 2000"
    assert validated(data, max_bytes=size).attachments[0].content == b"\x00" * 3000


def test_a_non_mapping_is_refused() -> None:
    assert problems_of(["from", "to"]) == {"mail": "must be an object"}


def test_null_optional_fields_mean_absent() -> None:
    mail = validated(minimal(cc=None, subject=None, html=None, headers=None, key=None, send_at=None))
    assert (mail.cc, mail.subject, mail.html, mail.headers, mail.key, mail.send_at) == (
        (),
        "",
        None,
        (),
        None,
        None,
    )


def test_validation_error_message_names_each_field() -> None:
    with pytest.raises(ValidationError) as caught:
        validated(minimal(priority="urgent", route="a b"))
    assert str(caught.value) == (
        "priority: must be one of high, default, bulk; route: must be 1 to 64 characters from A-Z a-z 0-9 _ -"
    )
    assert caught.value.field == "priority"


def _all_text_encodes(value: object) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, dict):
        return all(_all_text_encodes(k) and _all_text_encodes(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_all_text_encodes(item) for item in value)
    return True


_TEXT = st.text(st.sampled_from("aZ0 @\u00e9\udce9\ud800\U0001f600"), max_size=4)
_SCALAR = st.one_of(_TEXT, st.integers(), st.floats(), st.booleans(), st.none())


_FIELD = st.one_of(_SCALAR, st.lists(_SCALAR, max_size=10),
                   st.dictionaries(_TEXT, st.one_of(_SCALAR, st.lists(_SCALAR)), max_size=10))  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_TEXT, _FIELD, max_size=8))
def test_the_quick_ascii_look_passes_only_mails_whose_text_all_encodes(data: dict[str, Any]) -> None:
    """``unencodable_text``'s shortcut (``_small_ascii_mail``) answers True only where every string,
    at any depth, encodes as UTF-8; and then ``unencodable_text`` finds nothing, as its full walk would."""
    if fields._small_ascii_mail(data):
        assert _all_text_encodes(data)
    assert (fields.unencodable_text(data) == {}) == _all_text_encodes(data)


def test_the_common_mail_takes_the_quick_ascii_look() -> None:
    assert fields._small_ascii_mail(minimal(headers={"X-A": "1"}, metadata={"n": 1, "f": 1.5, "s": "x"}))
