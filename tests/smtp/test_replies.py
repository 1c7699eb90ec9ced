from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatcher.errors import ProtocolError
from dispatcher.smtp.parser import ReplyParser
from dispatcher.smtp.replies import Reply

GMAIL_550 = (
    b"550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n"
    b"550-5.1.1 double-checking the recipient's email address for typos or\r\n"
    b"550-5.1.1 unnecessary spaces. For more information, go to\r\n"
    b"550 5.1.1  https://support.google.com/mail/?p=NoSuchUser a1si123.45 - gsmtp\r\n"
)

SAMPLES: list[tuple[bytes, Reply]] = [
    (b"220 mx.test.example Python SMTP 1.4.6\r\n", Reply(220, ("mx.test.example Python SMTP 1.4.6",))),
    (
        b"250-mx.test.example\r\n250-SIZE 33554432\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 HELP\r\n",
        Reply(250, ("mx.test.example", "SIZE 33554432", "8BITMIME", "SMTPUTF8", "HELP")),
    ),
    (b"250\r\n", Reply(250, ("",))),
    (b"250 \r\n", Reply(250, ("",))),
    (b"250-\r\n250 end\r\n", Reply(250, ("", "end"))),
    (b"354 End data with <CR><LF>.<CR><LF>\n", Reply(354, ("End data with <CR><LF>.<CR><LF>",))),
    (b"550 5.1.1 <nobody@example.com>: Recipient address rejected\r\n",
     Reply(550, ("5.1.1 <nobody@example.com>: Recipient address rejected",), "5.1.1")),
    (b"421 4.7.0 Try again later, closing connection.\r\n",
     Reply(421, ("4.7.0 Try again later, closing connection.",), "4.7.0")),
    (GMAIL_550, Reply(550, tuple(
        line[4:].decode() for line in GMAIL_550.split(b"\r\n") if line
    ), "5.1.1")),
    (b"250 caf\xc3\xa9 \xff ok\r\n", Reply(250, ("café \ufffd ok",))),
]

NEXT_REPLY = b"250 2.1.0 Ok\r\n"


def _ids(sample: tuple[bytes, Reply]) -> str:
    return sample[0][:24].decode("latin-1")


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids)
def test_sample_fed_whole(sample: tuple[bytes, Reply]) -> None:
    raw, expected = sample
    parser = ReplyParser()
    assert parser.feed(raw) == [expected]
    assert not parser.pending


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids)
def test_sample_fed_one_byte_at_a_time(sample: tuple[bytes, Reply]) -> None:
    raw, expected = sample
    parser = ReplyParser()
    got: list[Reply] = []
    for index in range(len(raw)):
        out = parser.feed(raw[index : index + 1])
        if index < len(raw) - 1:
            assert out == []
            assert parser.pending
        got.extend(out)
    assert got == [expected]
    assert not parser.pending


@pytest.mark.parametrize("sample", SAMPLES, ids=_ids)
def test_sample_followed_by_start_of_next_reply(sample: tuple[bytes, Reply]) -> None:
    raw, expected = sample
    parser = ReplyParser()
    assert parser.feed(raw + NEXT_REPLY[:5]) == [expected]
    assert parser.pending
    assert parser.feed(NEXT_REPLY[5:]) == [Reply(250, ("2.1.0 Ok",))]
    assert not parser.pending


def test_pipelined_replies_in_one_read() -> None:
    parser = ReplyParser()
    replies = parser.feed(b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n550 5.1.1 No\r\n354 go\r\n")
    assert [r.code for r in replies] == [250, 250, 550, 354]
    assert [r.enhanced for r in replies] == ["2.1.0", "2.1.5", "5.1.1", None]


def test_clear_drops_partial_reply() -> None:
    parser = ReplyParser()
    assert parser.feed(b"220 ready\r\n250-smuggled\r\n250 in") == [Reply(220, ("ready",))]
    assert parser.pending
    parser.clear()
    assert not parser.pending
    assert parser.feed(b"250 fresh\r\n") == [Reply(250, ("fresh",))]


@pytest.mark.parametrize(
    "raw",
    [
        b"hello\r\n",
        b"25\r\n",
        b"\r\n",
        b"199 too low\r\n",
        b"600 too high\r\n",
        b"099 no\r\n",
        b"2500 no separator\r\n",
        b"250_x\r\n",
        b"25a ok\r\n",
        b"250-first\r\n251 other code\r\n",
        b"250-first\r\n550 other code\r\n",
        b"250 bare\rCR\r\n",
        b"\xff\xfe\xfd garbage\r\n",
    ],
)
def test_malformed_replies_raise(raw: bytes) -> None:
    parser = ReplyParser()
    with pytest.raises(ProtocolError) as caught:
        parser.feed(raw)
    assert caught.value.stage is None
    assert "b'" in str(caught.value)


def test_error_is_final() -> None:
    parser = ReplyParser()
    with pytest.raises(ProtocolError):
        parser.feed(b"garbage\r\n")
    with pytest.raises(ProtocolError, match="garbage"):
        parser.feed(b"250 ok\r\n")


def test_overlong_line_detected_without_newline() -> None:
    parser = ReplyParser(max_line_length=64)
    assert parser.feed(b"250-" + b"x" * 59) == []
    with pytest.raises(ProtocolError, match="longer than 64") as caught:
        parser.feed(b"x")
    assert len(str(caught.value)) < 200


def test_line_of_exactly_max_length_is_accepted() -> None:
    parser = ReplyParser(max_line_length=16)
    line = b"250 " + b"y" * 10 + b"\r\n"
    assert len(line) == 16
    assert parser.feed(line) == [Reply(250, ("y" * 10,))]


def test_overlong_line_arriving_whole_raises() -> None:
    parser = ReplyParser(max_line_length=16)
    with pytest.raises(ProtocolError, match="longer than 16"):
        parser.feed(b"250 " + b"y" * 11 + b"\r\n")


def test_too_many_lines() -> None:
    parser = ReplyParser(max_lines=3)
    assert parser.feed(b"250-a\r\n250-b\r\n250 c\r\n") == [Reply(250, ("a", "b", "c"))]
    with pytest.raises(ProtocolError, match="more than 3 lines"):
        parser.feed(b"250-a\r\n250-b\r\n250-c\r\n250-d\r\n")


def test_reply_properties() -> None:
    reply = Reply(550, ("5.1.1 User unknown", "5.1.1 see https://example.com/x"))
    assert reply.enhanced == "5.1.1"
    assert reply.text == "5.1.1 User unknown\n5.1.1 see https://example.com/x"
    assert reply.message == "User unknown\nsee https://example.com/x"
    assert reply.summary() == "550 5.1.1 User unknown"
    assert (reply.is_positive, reply.is_intermediate, reply.is_transient, reply.is_permanent) == (
        False, False, False, True,
    )
    assert Reply(250, ("ok",)).is_positive
    assert Reply(334, ("",)).is_intermediate
    assert Reply(451, ("4.3.0 try later",)).is_transient
    assert Reply(250, ("",)).summary() == "250"


def test_summary_truncates() -> None:
    reply = Reply(554, ("x" * 500,))
    summary = reply.summary(limit=40)
    assert len(summary) == 40
    assert summary.startswith("554 xxx")
    assert summary.endswith("...")


@pytest.mark.parametrize(
    ("code", "first", "enhanced"),
    [
        (250, "2.0.0 Ok", "2.0.0"),
        (550, "5.7.1 denied", "5.7.1"),
        (451, "4.4.2 timeout", "4.4.2"),
        (550, "4.1.1 class mismatch", None),
        (250, "5.0.0 class mismatch", None),
        (354, "3.0.0 not a class", None),
        (250, "2.0.0", "2.0.0"),
        (250, "2.0.0x not followed by space", None),
        (250, "2.0 too short", None),
        (250, "2.1234.0 subject too long", None),
        (250, "ok 2.0.0", None),
    ],
)
def test_enhanced_code_rules(code: int, first: str, enhanced: str | None) -> None:
    assert ReplyParser().feed(f"{code} {first}\r\n".encode()) == [Reply(code, (first,), enhanced)]
    assert Reply(code, (first,)).enhanced == enhanced


def test_enhanced_only_from_first_line() -> None:
    reply = ReplyParser().feed(b"550-Rejected\r\n550 5.7.1 policy\r\n")[0]
    assert reply.enhanced is None
    assert reply.message == "Rejected\n5.7.1 policy"


@pytest.mark.parametrize("code", [-1, 0, 199, 600, 1000])
def test_reply_refuses_codes_outside_range(code: int) -> None:
    with pytest.raises(ValueError, match=r"200\.\.599"):
        Reply(code, ("x",))


def test_reply_refuses_line_breaks_and_wrong_enhanced() -> None:
    with pytest.raises(ValueError):
        Reply(250, ("a\r\nb",))
    with pytest.raises(ValueError):
        Reply(550, ("x",), enhanced="2.0.0")


def test_dict_round_trip_through_json() -> None:
    reply = ReplyParser().feed(GMAIL_550)[0]
    stored = json.loads(json.dumps(reply.to_dict()))
    assert stored["code"] == 550
    assert stored["enhanced"] == "5.1.1"
    assert Reply.from_dict(stored) == reply


@pytest.mark.parametrize(
    "data",
    [{}, {"code": "250", "lines": ["x"]}, {"code": 250, "lines": "x"}, {"code": True, "lines": []}],
)
def test_from_dict_refuses_bad_data(data: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Reply.from_dict(data)


_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=40
)
_REPLY = st.builds(
    Reply,
    code=st.integers(min_value=200, max_value=599),
    lines=st.lists(_TEXT, min_size=1, max_size=5).map(tuple),
)


def _wire(reply: Reply, ending: bytes) -> bytes:
    out = b""
    for index, line in enumerate(reply.lines):
        separator = b" " if index == len(reply.lines) - 1 else b"-"
        out += str(reply.code).encode() + separator + line.encode() + ending
    return out


@given(
    replies=st.lists(_REPLY, min_size=1, max_size=6),
    ending=st.sampled_from([b"\r\n", b"\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=10),
)
def test_any_split_gives_the_same_replies(replies: list[Reply], ending: bytes, cuts: list[int]) -> None:
    stream = b"".join(_wire(reply, ending) for reply in replies)
    whole = ReplyParser().feed(stream)
    assert whole == replies
    parser = ReplyParser()
    got: list[Reply] = []
    start = 0
    for cut in [*sorted({c % (len(stream) + 1) for c in cuts}), len(stream)]:
        got.extend(parser.feed(stream[start:cut]))
        start = cut
    assert got == whole
    assert not parser.pending
