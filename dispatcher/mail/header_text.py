"""The one rule for text that ends up in a header line (addresses, subject, custom header values, file
names, the date): :func:`header_text_problem` — no CR, LF, NUL or other control characters, neither in the
text (:func:`control_character_problem`) nor in what any RFC 2047 encoded word in it decodes to
(:func:`encoded_word_problem`). The email package decodes such words while it writes, and Python 3.11.7 /
3.12.1 put the decoded line breaks on the wire (CVE-2024-6923; in a file name 3.13.0 too), so a value must
be judged by what it decodes to, not by how it looks.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
import unicodedata
from collections.abc import Iterator
from email import header as email_header
from email import policy as email_policy

_LINE_BREAKS = frozenset("\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# RFC 2047 §4: Q encoded text is printable ASCII but '=', '?' and space, plus =XX; B is base64.
_Q_TEXT = re.compile(r"(?:[\x21-\x3c\x3e\x40-\x7e]|=[0-9A-Fa-f]{2})*")
_Q_ESCAPE = re.compile(rb"=([0-9A-Fa-f]{2})")
_B_TEXT = re.compile(r"[A-Za-z0-9+/]*={0,2}")
_SHOWN = 40


def control_character_problem(value: str) -> str | None:
    """Say what is wrong if ``value`` may not go into a header line, else ``None``.

    CR and LF would let the value start a new header (header injection); NUL and other controls
    (including TAB and the Unicode line/paragraph separators) have no business in a header either.
    """
    if value.isascii() and value.isprintable():
        return None
    for char in value:
        if char in "\r\n":
            return "contains a line break (CR/LF) — header injection"
        if char == "\x00":
            return "contains a NUL character"
        if char in _LINE_BREAKS or unicodedata.category(char) == "Cc":
            return f"contains a control character (U+{ord(char):04X})"
    return None


def header_text_problem(value: str) -> str | None:
    """Say what is wrong if ``value`` may not go into a header line, raw or decoded; else ``None``."""
    if value.isascii() and value.isprintable() and "=?" not in value:
        return None
    return control_character_problem(value) or encoded_word_problem(value)


def encoded_words(value: str) -> Iterator[tuple[str, str, str, str]]:
    """Every RFC 2047 encoded word a lenient decoder may find in ``value``: ``(word, charset, encoding,
    encoded_text)``.

    As wide as the widest reader: the email package's parsers and ``email.header``'s regex take
    ``=?charset?q|b?text?=`` up to the first ``?=``, with or without whitespace around it, inside other
    text, inside quoted strings, and with whitespace inside. Every ``=?`` is tried as a start, so words
    that overlap (``=?utf-8?q?a?=?utf-8?q?=0A?=`` hides a second word in the first one's ``?=``) are all
    found. Linear: each start looks only as far as the next ``?`` and the next ``?=``.
    """
    start = value.find("=?")
    while start >= 0:
        mark = value.find("?", start + 2)
        if mark < 0:
            return
        if value[mark + 1 : mark + 2] in ("q", "Q", "b", "B") and value[mark + 2 : mark + 3] == "?":
            end = value.find("?=", mark + 3)
            if end < 0:
                return  # no word can end after this start, nor after any later one
            yield value[start : end + 2], value[start + 2 : mark], value[mark + 1], value[mark + 3 : end]
        start = value.find("=?", start + 1)


def encoded_word_problem(value: str) -> str | None:
    """What is wrong with the encoded words in ``value``, or ``None`` (also when it has none).

    Every word is decoded on its own — Q or B, any charset Python knows, an RFC 2231 ``*language`` suffix
    ignored — and refused when it is malformed (a reader would guess), names a charset Python does not
    know (the email package then decodes its bytes as ASCII, CR LF included), holds part of a character
    (RFC 2047 §5), decodes to a control character, or decodes to another encoded word.
    """
    found = False
    for word, charset, encoding, text in encoded_words(value):
        found = True
        shown = repr(word[:_SHOWN]) + ("…" if len(word) > _SHOWN else "")
        try:
            decoded = _decode_word(charset, encoding, text)
        except ValueError as exc:
            return f"encoded word {shown}: {exc}"
        problem = control_character_problem(decoded)
        if problem is not None:
            return f"encoded word {shown} {problem.replace('contains', 'decodes to', 1)}"
        if next(encoded_words(decoded), None) is not None:
            return f"encoded word {shown} decodes to another encoded word"
    if found:
        for decoded in _stdlib_decodings(value):
            problem = control_character_problem(decoded)
            if problem is not None:
                return f"encoded words {problem.replace('contains', 'decode to', 1)} (email package)"
    return None


def _decode_word(charset: str, encoding: str, text: str) -> str:
    if not text.isascii():
        raise ValueError("its encoded text must be ASCII")
    if encoding in "qQ":
        if not _Q_TEXT.fullmatch(text):
            raise ValueError("not valid Q encoding (RFC 2047 §4.2)")
        data = _Q_ESCAPE.sub(lambda m: bytes([int(m[1], 16)]), text.replace("_", " ").encode("ascii"))
    else:
        try:
            if not _B_TEXT.fullmatch(text):
                raise binascii.Error("characters outside the base64 alphabet")
            data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"not valid base64: {exc}") from None
    name = charset.partition("*")[0]  # RFC 2231 §5: charset*language
    try:
        return data.decode(name)
    except LookupError:
        raise ValueError(f"unknown charset {name!r}") from None
    except (UnicodeError, ValueError, TypeError):  # UnicodeDecodeError, or a codec's own complaint
        raise ValueError(f"its bytes are not valid {name} (or hold part of a character)") from None


def _stdlib_decodings(value: str) -> Iterator[str]:
    """What the email package itself makes of ``value``: its header parser (as an unstructured header)
    and ``email.header.decode_header``. A second opinion behind :func:`encoded_word_problem`."""
    with contextlib.suppress(ValueError, IndexError, TypeError):  # the parser's failures are undocumented
        yield str(email_policy.SMTP.header_factory("X-Checked", value))
    try:
        chunks = email_header.decode_header(value)
    except (ValueError, IndexError, TypeError):
        return
    for chunk, charset in chunks:
        if isinstance(chunk, bytes):
            try:
                yield chunk.decode(charset or "ascii", "replace")
            except LookupError:
                yield chunk.decode("latin-1")
        else:
            yield chunk
