"""Issue 14, item 1: header and body injection through RFC 2047 encoded words.

``=?utf-8?q?hi=0D=0AReply-To:_evil@evil.test?=`` is printable ASCII, so a check of the raw text passes it;
the email package of Python 3.11.7 / 3.12.1 decodes it while writing and puts the decoded CR LF on the
wire — a new ``Reply-To`` line, or with a blank line a replaced body (and in an attachment's file name on
every Python, 3.13 included). Two walls, each tested on its own:

* validation (``mail/fields``, ``mail/addresses``) decodes every encoded word and refuses a control
  character in what it decodes to, naming the field;
* ``build_message`` checks the header block of every part it wrote against the headers it set, and raises
  ``HeaderInjection`` rather than hand over bytes with a line it was not asked for.

Every test looks at the written bytes (or the refusal), never only at the input.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Callable
from email import policy
from email.parser import BytesParser
from typing import Any

import pytest
import redis
from servers import ScriptedSmtpServer

import dispatcher
from dispatcher import cli
from dispatcher.dashboard import DashboardConfig, create_app
from dispatcher.delivery.attempt import Attempt
from dispatcher.errors import HeaderInjection, ValidationError
from dispatcher.mail.attachments import Attachment
from dispatcher.mail.message import Mail
from dispatcher.mail.mime import build_message, check_written, compose, validated
from dispatcher.queue.keys import send_key
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

PAYLOAD = "=?utf-8?q?hi=0D=0AReply-To:_evil@evil.test?="
BASE: dict[str, Any] = {"from": "App <app@example.com>", "to": "ann@example.org", "text": "hello"}
TOP_HEADERS = [
    "from",
    "to",
    "date",
    "message-id",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
]


def b_word(text: str, charset: str = "utf-8") -> str:
    return f"=?{charset}?b?{base64.b64encode(text.encode(charset)).decode()}?="


# Each decodes to something with a control character in it. The ids say how it is hidden.
HOSTILE = {
    "crlf": PAYLOAD,
    "lf-only": "=?utf-8?q?hi=0AReply-To:_evil@evil.test?=",
    "cr-only": "=?utf-8?q?hi=0DReply-To:_evil@evil.test?=",
    "body": "=?utf-8?q?hi=0D=0A=0D=0Anew_body?=",
    "base64": b_word("hi\r\nReply-To: evil@evil.test"),
    "base64-upper-B": b_word("hi\nX: 1").replace("?b?", "?B?"),
    "upper-Q": "=?UTF-8?Q?hi=0AReply-To:_evil@evil.test?=",
    "nul": "=?utf-8?q?hi=00there?=",
    "tab": "=?utf-8?q?hi=09there?=",
    "unicode-line-separator": "=?utf-8?q?hi=E2=80=A8there?=",
    "latin-1": "=?iso-8859-1?q?caf=E9=0AX-Evil:_1?=",
    "language-suffix": "=?utf-8*en?q?hi=0AX-Evil:_1?=",
    "unknown-charset": "=?x-no-such-charset?q?hi=0D=0AReply-To:_evil@evil.test?=",
    "adjacent-words": "=?utf-8?q?hi=0D?= =?utf-8?q?=0AReply-To:_evil@evil.test?=",
    "adjacent-no-space": "=?utf-8?q?hi?==?utf-8?q?=0AX-Evil:_1?=",
    "second-word": "Hello =?utf-8?q?Ann?= and =?utf-8?b?" + base64.b64encode(b"\r\nX: 1").decode() + "?=",
    "glued-to-text": "Hello=?utf-8?q?=0AX-Evil:_1?=",
    "sharing-an-equals-sign": "=?utf-8?q?b?=?utf-8?q?=0AX-Evil:_1?=",
    "whitespace-inside": "=?utf-8?q?hi =0AX-Evil:_1?=",
    "nested": "=?utf-8?q?=3D=3Futf-8=3Fq=3Fhi=3D0A=3F=3D?=",
}


def header_names(raw: bytes) -> list[str]:
    """The top-level header field names as written: every line of the header block that is not a
    folded continuation, up to the first empty line."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[0].decode().lower() for line in head.split(b"\r\n") if line[:1] not in b" \t"]


def parse(raw: bytes) -> Any:
    return BytesParser(policy=policy.default).parsebytes(raw)


def unchecked(**changes: Any) -> Mail:
    """A valid mail with ``changes`` applied behind validation's back (the ``Mail`` constructor does not
    check): what ``build_message`` must cope with on its own."""
    return dataclasses.replace(validated(BASE), **changes)


def attachment(filename: str) -> dict[str, str]:
    return {"filename": filename, "content_type": "text/plain", "content": "aGk="}


# --- validation: what a value decodes to ---------------------------------------------------------------

PLACES: dict[str, Callable[[str], tuple[dict[str, Any], str]]] = {
    "subject": lambda v: ({"subject": v}, "subject"),
    "custom header": lambda v: ({"headers": {"X-Campaign": v}}, "headers.X-Campaign"),
    "from display name": lambda v: ({"from": f'"{v}" <app@example.com>'}, "from"),
    "to display name": lambda v: ({"to": [f'"{v}" <ann@example.org>']}, "to[0]"),
    "attachment file name": lambda v: ({"attachments": [attachment(v)]}, "attachments[0].filename"),
}


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_hostile_encoded_word_is_refused_naming_its_field(place: str, value: str) -> None:
    extra, path = PLACES[place](value)
    for build in (False, True):  # the producer (no MIME at enqueue) and a full build
        with pytest.raises(ValidationError) as caught:
            validated({**BASE, **extra}, build=build)
        assert path in caught.value.problems, caught.value.problems
        assert "encoded word" in caught.value.problems[path], caught.value.problems


def test_the_problem_says_what_the_word_decodes_to() -> None:
    with pytest.raises(ValidationError) as caught:
        validated({**BASE, "subject": PAYLOAD})
    assert caught.value.problems == {
        "subject": f"encoded word {PAYLOAD[:40]!r}… decodes to a line break (CR/LF) — header injection"
    }
    with pytest.raises(ValidationError) as caught:
        validated({**BASE, "subject": HOSTILE["nul"]})
    assert caught.value.problems["subject"].endswith("decodes to a NUL character")
    with pytest.raises(ValidationError) as caught:
        validated({**BASE, "subject": HOSTILE["unknown-charset"]})
    assert "unknown charset 'x-no-such-charset'" in caught.value.problems["subject"]


@pytest.mark.parametrize(
    "value",
    [
        "=?utf-8?q?hi=ZZ?=",  # '=' not followed by two hex digits
        "=?utf-8?b?not*base64?=",
        "=?utf-8?q?=C3?=",  # half a character (RFC 2047 §5: each word holds whole characters)
        "=?utf-8?q?caf\u00e9?=",  # encoded text must be ASCII
    ],
)
def test_a_malformed_encoded_word_is_refused(value: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validated({**BASE, "subject": value})
    assert "encoded word" in caught.value.problems["subject"]


def test_every_producer_refuses_it(redis_client: redis.Redis) -> None:
    data = {**BASE, "subject": PAYLOAD}
    with pytest.raises(ValidationError) as caught:
        dispatcher.enqueue(data, connection=redis_client)
    assert "subject" in caught.value.problems
    [result] = Producer(redis_client).enqueue_many([data])
    assert isinstance(result, ValidationError) and "subject" in result.problems

    url = redis_client.connection_pool.connection_kwargs
    redis_url = f"redis://{url['host']}:{url['port']}/0"
    out, err = io.StringIO(), io.StringIO()
    argv = ["--redis-url", redis_url, "send", "--from", "app@example.com", "--to", "ann@example.org",
            "--text", "x", "--header", f"X-Campaign: {PAYLOAD}"]  # fmt: skip
    assert cli.main(argv, out=out, err=err) == cli.EXIT_USAGE
    assert "headers.X-Campaign: encoded word" in err.getvalue()

    app = create_app(DashboardConfig(redis_url=redis_url, api_token="t" * 32, open_access=True))
    response = app.test_client().post(
        "/api/v1/messages", json=data, headers={"Authorization": f"Bearer {'t' * 32}"}
    )
    assert response.status_code == 422 and "subject" in response.get_json()["problems"]
    assert redis_client.dbsize() == 0  # nothing stored by any of them


# --- what is legitimate stays working ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "shown"),
    [
        ("=?utf-8?q?Gr=C3=BC=C3=9Fe?=", "Grüße"),
        (b_word("Grüße aus Köln"), "Grüße aus Köln"),
        ("=?iso-8859-1?q?caf=E9?= =?utf-8?q?_au_lait?=", "café au lait"),
        ("=?ISO-2022-JP?B?GyRCJUYlOSVIGyhC?=", "テスト"),  # ESC bytes in the encoding, clean text
    ],
)
def test_a_clean_pre_encoded_subject_is_accepted_and_written(subject: str, shown: str) -> None:
    raw = build_message(validated({**BASE, "subject": subject}))
    assert header_names(raw) == [*TOP_HEADERS[:2], "subject", *TOP_HEADERS[2:]]
    assert parse(raw)["Subject"] == shown


@pytest.mark.parametrize(
    "subject", ["=?", "What does =? mean", "2+2=?", "=?utf-8", "a =?b?c d?= e", "?= =?", "=?utf-8?x?y?="]
)
def test_text_with_a_lone_marker_is_not_an_encoded_word_and_is_accepted(subject: str) -> None:
    raw = build_message(validated({**BASE, "subject": subject, "headers": {"X-Note": subject}}))
    assert header_names(raw) == [*TOP_HEADERS[:2], "subject", *TOP_HEADERS[2:5], "x-note", *TOP_HEADERS[5:]]
    parsed = parse(raw)
    assert parsed["Subject"] == subject and parsed["X-Note"] == subject


def test_clean_encoded_words_in_a_display_name_header_and_file_name_are_accepted() -> None:
    m = validated({**BASE, "from": "=?utf-8?q?Zo=C3=AB?= <app@example.com>",
                   "headers": {"X-Campaign": "=?utf-8?q?r=C3=A9sum=C3=A9?="},
                   "attachments": [attachment("=?utf-8?q?r=C3=A9sum=C3=A9.txt?=")]})  # fmt: skip
    parsed = parse(build_message(m))
    assert parsed["From"].addresses[0].display_name == "Zoë"
    assert parsed["X-Campaign"] == "résumé"
    [part] = list(parsed.iter_attachments())
    assert part.get_filename() == "résumé.txt"


# --- the writer: never a line it was not asked for -----------------------------------------------------


def built_or_refused(mail: Mail) -> bytes | None:
    try:
        return build_message(mail)
    except HeaderInjection:
        return None


WRITER_CASES: dict[str, Callable[[], Mail]] = {
    "subject": lambda: unchecked(subject=PAYLOAD),
    "subject, LF only": lambda: unchecked(subject=HOSTILE["lf-only"]),
    "subject, base64": lambda: unchecked(subject=HOSTILE["base64"]),
    "subject, new body": lambda: unchecked(subject=HOSTILE["body"]),
    "custom header": lambda: unchecked(headers=(("X-Campaign", PAYLOAD),)),
    "attachment file name": lambda: unchecked(attachments=(Attachment(PAYLOAD, "text/plain", b"hi"),)),
    "attachment file name, new body": lambda: unchecked(
        attachments=(Attachment(HOSTILE["body"], "text/plain", b"hi"),)
    ),
}


@pytest.mark.parametrize("case", WRITER_CASES)
def test_build_message_never_writes_a_header_it_was_not_asked_for(case: str) -> None:
    """Validation bypassed: the writer alone must refuse, or write bytes whose every part has exactly the
    headers it set (Python 3.13's email package encodes the subject safely; 3.11.7 and 3.12.1 do not;
    none of them the file name)."""
    mail = WRITER_CASES[case]()
    raw = built_or_refused(mail)
    if raw is None:
        return
    expected = compose(mail)
    parsed = parse(raw)
    assert "Reply-To" not in parsed and "X-Evil" not in parsed, raw.decode()
    written = [[name.lower() for name in part] for part in parsed.walk()]
    assert written == [[name.lower() for name in part] for part in expected.walk()], raw.decode()
    assert b"new body" not in raw and b"new_body" not in raw.split(b"\r\n\r\n", 1)[1], raw.decode()


def test_header_injection_is_a_validation_error_naming_the_field() -> None:
    mail = unchecked(attachments=(Attachment(PAYLOAD, "text/plain", b"hi"),))
    with pytest.raises(HeaderInjection) as caught:
        build_message(mail)
    assert isinstance(caught.value, ValidationError)
    assert list(caught.value.problems) == ["attachments"]
    assert "header injection" in str(caught.value)


def good_bytes() -> tuple[Any, bytes]:
    mail = validated({**BASE, "subject": "Hi", "html": "<p>hello</p>", "attachments": [attachment("a.txt")]})
    message = compose(mail)
    return message, build_message(mail)


@pytest.mark.parametrize(
    ("find", "replace"),
    [
        (b"Subject: Hi\r\n", b"Subject: Hi\r\nReply-To: evil@evil.test\r\n"),  # an extra header line
        (b"Subject: Hi\r\n", b"Subject: Hi\r\n\r\nnew body\r\n"),  # the header block ended early
        (b"Subject: Hi\r\n", b"Subject: Hi\nReply-To: evil@evil.test\r\n"),  # a bare LF (SMTP makes it CRLF)
        (b"Subject: Hi\r\n", b"Subject: Hi\rX: 1\r\n"),  # a bare CR
        (b"Subject: Hi\r\n", b"Subject: H\x00i\r\n"),  # a NUL
        (b"Subject: Hi\r\n", b"Subject: Hi\r\nno colon here\r\n"),  # a line that is no header at all
        (b"Subject: Hi\r\n", b""),  # a header missing
        (b"Subject: Hi\r\n", b"Subject: Hi\r\nSubject: Hi\r\n"),  # one header twice
        (b'filename="a.txt"', b'filename="a\r\nX-Evil: 1"'),  # in a part's header block
        (b'filename="a.txt"', b'filename="a"\r\n\r\nnew body'),  # a part's body replaced
    ],
)
def test_the_written_header_check_refuses_tampered_bytes(find: bytes, replace: bytes) -> None:
    message, raw = good_bytes()
    check_written(raw, message)  # the untouched bytes pass
    assert raw.count(find) == 1
    with pytest.raises(HeaderInjection):
        check_written(raw.replace(find, replace), message)


def test_the_written_header_check_accepts_folded_lines_and_refuses_a_fold_first() -> None:
    mail = validated({**BASE, "subject": "word " * 40})
    message, raw = compose(mail), build_message(mail)
    assert b"\r\n word" in raw  # folded
    check_written(raw, message)
    with pytest.raises(HeaderInjection):
        check_written(b" " + raw, message)


def test_a_fake_part_delimiter_in_a_header_is_refused() -> None:
    message, raw = good_bytes()
    boundary = message.get_boundary().encode()
    tampered = raw.replace(b"Subject: Hi\r\n", b"Subject: Hi\r\n\r\n--" + boundary + b"\r\nX: 1\r\n", 1)
    with pytest.raises(HeaderInjection):
        check_written(tampered, message)


# --- at the worker: a hostile source written straight into Redis ---------------------------------------


def test_the_worker_fails_a_hostile_source_permanently_and_sends_nothing(
    redis_client: redis.Redis, scripted_server: Callable[..., ScriptedSmtpServer]
) -> None:
    server = scripted_server()
    send_id = Producer(redis_client).enqueue(BASE).id
    hostile = json.dumps({**BASE, "subject": PAYLOAD})
    redis_client.hset(send_key(send_id), "source", hostile)  # a raw Redis writer
    runtime = Runtime(
        load_settings({"SMTP_URL": f"smtp://127.0.0.1:{server.port}?tls=off"}, need_routes=True)
    )
    try:
        job_id = SendStore(redis_client).load(send_id).rq_job or send_id  # type: ignore[union-attr]
        assert Attempt(runtime, redis_client, job_id, send_id).run()["state"] == "failed"
    finally:
        runtime.close()
    rec = SendStore(redis_client).load(send_id)
    assert rec is not None and "encoded word" in rec.status()["reason"]["text"]
    assert server.connection_count == 0 and not server.messages
