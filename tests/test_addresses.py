from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.mail import addresses, fields
from dispatcher.mail.addresses import Address, control_character_problem, parse_address

ACCEPTED = [
        ("ann@example.com", "", "ann@example.com"),
        ("  ann@example.com ", "", "ann@example.com"),
        ("<ann@example.com>", "", "ann@example.com"),
        ("Ann Lee <ann@example.com>", "Ann Lee", "ann@example.com"),
        ('"Lee, Ann" <ann@example.com>', "Lee, Ann", "ann@example.com"),
        ('"say \\"hi\\"" <ann@example.com>', 'say "hi"', "ann@example.com"),
        ("John Q. Public <john@example.com>", "John Q. Public", "john@example.com"),
        ("Zoë <zoe@example.com>", "Zoë", "zoe@example.com"),
        ("=?utf-8?q?Zo=C3=AB?= <zoe@example.com>", "Zoë", "zoe@example.com"),
        ("first.o'neil+tag@sub.example.co.uk", "", "first.o'neil+tag@sub.example.co.uk"),
        ('"john doe"@example.com', "", '"john doe"@example.com'),
        ('"john"@example.com', "", "john@example.com"),
        ("ann@[192.0.2.1]", "", "ann@[192.0.2.1]"),
        ("ann@[IPv6:2001:db8::1]", "", "ann@[IPv6:2001:db8::1]"),
        ("josé@exämple.com", "", "josé@exämple.com"),
        ("用户 <用户@例子.中国>", "用户", "用户@例子.中国"),
        ("ann@xn--exmple-cua.com", "", "ann@xn--exmple-cua.com"),
        ("ann@localhost", "", "ann@localhost"),
]


@pytest.mark.parametrize(("raw", "display_name", "addr_spec"), ACCEPTED)
def test_accepted_forms(raw: str, display_name: str, addr_spec: str) -> None:
    address = parse_address(raw)
    assert address == Address(display_name=display_name, addr_spec=addr_spec)
    assert parse_address(address.formatted()) == address


REJECTED = [
        ("", "empty"),
        ("   ", "empty"),
        ("annexample.com", "not an email address: no '@'"),
        ("Ann <annexample.com>", "not an email address: no '@'"),
        ("@example.com", "not an email address: nothing before '@'"),
        ("ann@", "not an email address: nothing after '@'"),
        ("ann@b@example.com", "not an email address: more than one '@'"),
        ("ann lee@example.com", "local part contains whitespace"),
        ("ann@exa mple.com", "domain contains whitespace"),
        (".ann@example.com", "local part: misplaced '.' (leading, trailing or doubled)"),
        ("an..n@example.com", "local part: misplaced '.' (leading, trailing or doubled)"),
        ("ann(x)@example.com", "local part: character '(' is not allowed unquoted"),
        ("a" * 65 + "@example.com", "local part too long: more than 64 octets"),
        ("é" * 33 + "@example.com", "local part too long: more than 64 octets"),
        ("a@" + ".".join(["b" * 60] * 5) + ".com", "domain too long: more than 253 octets"),
        ("a" * 60 + "@" + ".".join(["b" * 60] * 4) + ".com", "too long: more than 254 octets"),
        ("ann@" + "b" * 64 + ".com", "domain label too long: more than 63 octets"),
        ("ann@exa_mple.com", "domain label 'exa_mple': only letters, digits and inner hyphens are allowed"),
        ("ann@-example.com", "domain label '-example': only letters, digits and inner hyphens are allowed"),
        ("ann@example..com", "domain: empty label (leading or doubled '.')"),
        ("ann@.example.com", "domain: empty label (leading or doubled '.')"),
        ("ann@example.com.", "domain ends with '.'"),
        ("ann@192.0.2.1", "domain: an IP address must be written in brackets, e.g. [192.0.2.1]"),
        ("ann@[192.0.2.300]", "domain: '[192.0.2.300]' is not an IPv4 or IPv6 address literal"),
        ("ann@[192.0.2.1", "domain: address literal without closing ']'"),
        ("ann@example.com, bob@example.com", "exactly one address expected; use a list for several"),
        ("Lee, Ann <ann@example.com>", "exactly one address expected; use a list for several"),
        ("Ann <ann@example.com> x", "not an email address: text after '>'"),
        ("ann@example.com>", "not an email address: '>' without '<'"),
        ("Ann <a<nn@example.com>", "not an email address: stray '<' or '>'"),
        ("Ann@Home <ann@example.com>", "display name: special character '@' must be quoted"),
        ('"Ann <ann@example.com>', "local part: unbalanced quotes"),
        ("ann@example.com\r\nBcc: victim@example.org", "contains a line break (CR/LF) — header injection"),
        ("Ann\n <ann@example.com>", "contains a line break (CR/LF) — header injection"),
        ("ann\x00@example.com", "contains a NUL character"),
        ("Ann\tLee <ann@example.com>", "contains a control character (U+0009)"),
        ("Ann\u2028 <ann@example.com>", "contains a control character (U+2028)"),
]


@pytest.mark.parametrize(("raw", "problem"), REJECTED)
def test_rejected_forms(raw: str, problem: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_address(raw)
    assert str(caught.value) == problem


def test_encoded_word_that_decodes_to_a_line_break_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"decodes to a line break \(CR/LF\)"):
        parse_address("=?utf-8?q?Ann=0D=0AX?= <ann@example.com>")


def test_non_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="must be a string"):
        parse_address(42)  # type: ignore[arg-type]


def test_parts_and_ascii_flag() -> None:
    ascii_address = parse_address("Ann <Ann.Lee@Example.COM>")
    assert (ascii_address.local, ascii_address.domain) == ("Ann.Lee", "Example.COM")
    assert ascii_address.is_ascii
    assert parse_address("Zoë <zoe@example.com>").is_ascii  # a UTF-8 display name needs no SMTPUTF8
    utf8_local = parse_address("josé@example.com")
    assert not utf8_local.is_ascii
    assert (utf8_local.local, utf8_local.domain) == ("josé", "example.com")


def test_formatted_quotes_only_when_needed() -> None:
    assert Address("Ann Lee", "ann@example.com").formatted() == "Ann Lee <ann@example.com>"
    assert Address("Lee, Ann", "ann@example.com").formatted() == '"Lee, Ann" <ann@example.com>'
    assert Address('a "b" \\ c', "ann@example.com").formatted() == '"a \\"b\\" \\\\ c" <ann@example.com>'
    assert Address("", "ann@example.com").formatted() == "ann@example.com"


def test_control_character_problem() -> None:
    assert control_character_problem("Plain subject — with ünïcode") is None
    assert control_character_problem("a\rb") == "contains a line break (CR/LF) — header injection"
    assert control_character_problem("a\x00b") == "contains a NUL character"
    assert control_character_problem("a\x7fb") == "contains a control character (U+007F)"
    assert control_character_problem("a\x85b") == "contains a control character (U+0085)"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_accepted_text_round_trips_and_stays_one_line(raw: str) -> None:
    try:
        address = parse_address(raw)
    except ValueError:
        return
    formatted = address.formatted()
    assert control_character_problem(formatted) is None
    assert "@" in address.addr_spec
    assert parse_address(formatted) == address


@settings(max_examples=200, deadline=None)
@given(
    st.text(st.characters(blacklist_categories=["Cc", "Cs", "Zl", "Zp"]), max_size=20),
    st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,2}", fullmatch=True),
)
def test_any_clean_display_name_round_trips(name: str, local: str) -> None:
    address = Address(display_name=name.strip(), addr_spec=f"{local}@example.com")
    if "=?" in address.display_name:
        return  # encoded-words are decoded on purpose, covered above
    assert parse_address(address.formatted()) == address


_ATOM_CHARS = st.sampled_from("abcXYZ019!#$%&'*+/=?^_`{|}~-")
_plain_local = st.lists(st.text(_ATOM_CHARS, min_size=1, max_size=8), min_size=1, max_size=3).map(".".join)
_plain_domain = st.tuples(
    st.lists(st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True), max_size=2),
    st.from_regex(r"[a-z]{2,6}", fullmatch=True),
).map(lambda parts: ".".join([*parts[0], parts[1]]))
_plain_name = st.lists(st.from_regex(r"[A-Za-z0-9]{1,6}", fullmatch=True), max_size=3).map(" ".join)


@given(local=_plain_local, domain=_plain_domain, name=_plain_name)
def test_the_fast_path_for_plain_addresses_agrees_with_the_stdlib_reading(
    local: str, domain: str, name: str
) -> None:
    text = f"{name} <{local}@{domain}>" if name else f"{local}@{domain}"
    parsed = parse_address(text)
    assert addresses._stdlib_reading(parsed) == parsed
    assert parsed == Address(display_name=name, addr_spec=f"{local}@{domain}")


# Around every limit and shape rule the one-match fast path checks for itself.
LONG_DOMAIN = ".".join(["b" * 63] * 3)
EDGES = [
    "a" * 64 + "@example.com", "a" * 65 + "@example.com", "ann@" + "b" * 63 + ".com",
    "ann@" + "b" * 64 + ".com", f"a@{LONG_DOMAIN}." + "c" * 61, f"a@{LONG_DOMAIN}." + "c" * 62,
    "a" * 64 + "@" + LONG_DOMAIN[:127] + "." + "c" * 61, "a" * 64 + "@" + LONG_DOMAIN[:127] + "." + "c" * 62,
    "ann@123", "ann@b.123", "ann@123.com", "ann@b-.com", "ann@-b.com", "ann@b--c.com", "ann@b.c-",
    "ann@b.1-2", "N" * 200 + " <ann@example.com>", "N" * 201 + " <ann@example.com>", "Name<ann@example.com>",
    "Name  <ann@example.com>", "Name <ann@example.com> ", " Name <ann@example.com>", "Name <ann@example.com",
    "<ann@example.com>", "a=?b@example.com", "=?utf-8?q?x?= <ann@example.com>", "a.b.c@x.y.z", "a..b@x.y",
    "a.@x.y", ".a@x.y", "a@x..y", "a@.x", "a@x.", "Ann Lee <ann@example.com>>", "Ann 2 <a+b@x-y.example>",
    "ann@[192.0.2.1]", "Ann Lee <ann@[192.0.2.1]>", "a@b@c.com", "ann@exa_mple.com", "ann lee@example.com",
]  # fmt: skip


def _strict(raw: str) -> Address | None:
    try:
        return addresses._parsed_address(raw)
    except ValueError:
        return None


@pytest.mark.parametrize("raw", [raw for raw, *_ in ACCEPTED] + [raw for raw, _ in REJECTED] + EDGES)
def test_the_fast_path_returns_what_the_strict_parser_returns(raw: str) -> None:
    """``_plain_address`` either declines (None) or answers exactly as the strict parser does; never
    accepts what the strict parser refuses."""
    fast = addresses._plain_address(raw)
    assert fast is None or fast == _strict(raw)


@settings(max_examples=500, deadline=None)
@given(st.text(st.sampled_from("aZ09.-_+=?@<> \"[]é"), max_size=30))
def test_the_fast_path_agrees_with_the_strict_parser_on_any_text(raw: str) -> None:
    fast = addresses._plain_address(raw)
    assert fast is None or fast == _strict(raw)


def test_common_addresses_take_the_fast_path() -> None:
    assert addresses._plain_address("Recipient 7 <rcpt7@bench.example>") == Address(
        "Recipient 7", "rcpt7@bench.example"
    )
    assert addresses._plain_address("first.o'neil+tag@sub.example.co.uk") is not None


def _uncached(raw: object) -> Address | str:
    """What ``parse_address`` answered before it kept answers: the address, or the ValueError's text."""
    if not isinstance(raw, str):
        return "must be a string"
    try:
        plain = addresses._plain_address(raw)
        return plain if plain is not None else addresses._parsed_address(raw)
    except ValueError as exc:
        return str(exc)


def _answer(raw: object) -> Address | str:
    try:
        return parse_address(raw)  # type: ignore[arg-type]
    except ValueError as exc:
        return str(exc)


CORPUS = [raw for raw, *_ in ACCEPTED] + [raw for raw, _ in REJECTED] + EDGES


@pytest.mark.parametrize("raw", [*CORPUS, "x" * 2000 + "@example.com", None, 7, b"ann@example.com"])
def test_a_kept_answer_is_the_answer_parsing_gives(raw: object) -> None:
    """The first call parses (and keeps the answer), the second finds it: both answer exactly as the
    parser itself, the same address or the same error message."""
    addresses._KNOWN.clear()
    expected = _uncached(raw)
    assert _answer(raw) == expected
    assert _answer(raw) == expected
    if isinstance(raw, str) and len(raw) <= addresses._LONGEST_ACCEPTED:
        assert addresses._KNOWN[raw] == expected  # kept: the second answer came from it


@settings(max_examples=300, deadline=None)
@given(st.text(st.sampled_from("aZ09.-_+=?@<> \"[]é,\\\n"), max_size=30))
def test_kept_answers_agree_with_parsing_on_any_text(raw: str) -> None:
    expected = _uncached(raw)
    assert _answer(raw) == expected
    assert _answer(raw) == expected


def test_a_str_subclass_is_parsed_not_looked_up() -> None:
    class Odd(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    addresses._KNOWN.clear()
    parse_address("ann@example.com")
    with pytest.raises(ValueError, match="no '@'"):
        parse_address(Odd("no at sign"))
    assert "no at sign" not in addresses._KNOWN


def test_the_kept_answers_are_bounded() -> None:
    addresses._KNOWN.clear()
    for n in range(addresses._KNOWN_MAX + 10):
        parse_address(f"user{n}@example.com")
    assert len(addresses._KNOWN) <= addresses._KNOWN_MAX
    assert parse_address("user3@example.com") == Address("", "user3@example.com")


def test_a_list_names_each_bad_item_as_a_single_address_would_be_named() -> None:
    """``fields.address_list`` writes an item's path only for a problem; what it finds is what checking
    each item as one address (``fields.one_address`` at ``to[i]``) finds, in the same order."""
    items: list[object] = [*CORPUS, None, 7, ["a@x.org"], "ann@example.com"]
    for start in range(0, len(items), 7):
        chunk = items[start : start + 7]
        problems: dict[str, str] = {}
        found = fields.address_list("to", chunk, problems)
        expected_problems: dict[str, str] = {}
        expected = [fields.one_address(f"to[{i}]", item, expected_problems) for i, item in enumerate(chunk)]
        assert found == tuple(a for a in expected if a is not None)
        assert list(problems.items()) == list(expected_problems.items())
