"""How ``build_message`` writes each header line: the compat32 policy it builds with, and one folding rule.

The modern policy (``email.policy.default``) parses every header value into a token tree when it is set
and refolds the tree when it is written; that, and a new header class built by the registry for each
header, was a third of a worker's CPU per mail (issue 15). Under ``compat32`` a header value is a plain
string, so :class:`WirePolicy` (compat32, CRLF, 78 columns) keeps the values as they were set and folds
each one when it is written, by :func:`field`:

* a value that fits on its line as it is (printable, ASCII unless the message is SMTPUTF8): as it is;
* longer printable ASCII text, and ``Content-Type``/``Content-Disposition`` parameter lists: folded at its
  spaces (at ``;`` for the parameter lists) by ``email.header.Header``, when no word is too long for a line;
* non-ASCII text in a 7-bit message: RFC 2047 encoded words of UTF-8 written by ``email.header.Header``
  (split between characters, each at most 75 characters);
* anything else (an over-long word, UTF-8 text to fold, a pre-encoded word in text that must be
  encoded, a long Message-ID, a long parameter): the modern policy's own folding, exactly today's bytes —
  rare shapes keep the slow path.

A pre-encoded word (``=?utf-8?q?...?=``) in a value that fits is written as it was given: a reader decodes
it exactly as it decoded what the modern policy wrote after decoding it itself (which is how Python
3.11.7 / 3.12.1 put a decoded CR LF on the wire, CVE-2024-6923). The address headers come folded by
``address_header`` (:class:`Prefolded`) and are written as they are.
"""

from __future__ import annotations

from email import policy as email_policy
from email.header import Header
from email.policy import Compat32
from typing import Any

from dispatcher.mail.address_header import LINE

# Lines of encoded words: a space and a word of at most 75 characters (RFC 2047 §2; at 78 columns the
# email package writes words of 76).
_EW_LINE = 76
_PARAMETER_HEADERS = frozenset({"content-type", "content-disposition"})
_STRUCTURED = frozenset({"message-id", "date", "mime-version", "content-transfer-encoding", "content-id"})
# The modern policies, writing LF: the fold of a rare shape, the same as the builder before issue 15.
_MODERN = {utf8: (email_policy.SMTPUTF8 if utf8 else email_policy.SMTP).clone(linesep="\n")
           for utf8 in (False, True)}  # fmt: skip


class Prefolded(str):
    """A header value folded already (lines joined by LF, each continuation starting with a space):
    written as it is."""

    __slots__ = ()


class WirePolicy(Compat32):
    """compat32 with CRLF line ends and 78 columns: values stay strings, :func:`field` folds them once per
    message (``folded`` caches what it wrote, which ``check_written`` reads again)."""

    utf8: bool = False
    """Header text may be UTF-8 (RFC 6532: a message with UTF-8 addresses, sent with SMTPUTF8)."""
    folded: dict[tuple[str, str], bytes] | None = None
    """(name, value) -> the bytes written for it, for one message (:meth:`for_message`)."""

    @classmethod
    def for_message(cls, *, utf8: bool) -> WirePolicy:
        """A policy for one message: its own cache of folded headers."""
        return _WIRE.clone(utf8=utf8, folded={})  # type: ignore[call-arg]

    def fold(self, name: str, value: Any) -> str:
        return field(name, value, utf8=self.utf8).replace("\n", "\r\n") + "\r\n"

    def fold_binary(self, name: str, value: Any) -> bytes:
        key = (name, value)
        found = self.folded.get(key) if self.folded is not None else None
        if found is None:
            found = self.fold(name, value).encode("utf-8" if self.utf8 else "ascii")
            if self.folded is not None:
                self.folded[key] = found
        return found


_WIRE = WirePolicy(linesep="\r\n", max_line_length=LINE, mangle_from_=False)


def field(name: str, value: str, *, utf8: bool) -> str:
    """The header field ``name: value`` folded, its lines joined by LF (no final line end)."""
    if isinstance(value, Prefolded):
        return f"{name}: {value}"
    line = f"{name}: {value}"
    if len(line) <= LINE and value.isprintable() and (utf8 or value.isascii()):
        return line
    lowered = name.lower()
    if lowered in _STRUCTURED or not value.isprintable():
        return _modern(name, value, utf8)
    if lowered in _PARAMETER_HEADERS:
        return _fits(_header(name, value, None, ";")) or _modern(name, value, utf8)
    if "=?" in value:
        return _modern(name, value, utf8)  # encoded words to decode before the text is folded
    if value.isascii():
        if value != value.strip(" "):
            return _modern(name, value, utf8)  # white space at an end stays where the modern policy puts it
        return _fits(_header(name, value, None, " ")) or _modern(name, value, utf8)
    if utf8:
        return _modern(name, value, utf8)
    # Spaces at the start are dropped (a reader strips them), spaces at the end written after the words
    # (a reader keeps them): as the modern policy writes them, outside its encoded words.
    words = _header(name, value.strip(" "), "utf-8", " ", _EW_LINE)
    return _fits(words + value[len(value.rstrip(" ")) :]) or _modern(name, value, utf8)


def _header(name: str, value: str, charset: str | None, splitchars: str, width: int = LINE) -> str:
    header = Header(value, charset, header_name=name)
    return f"{name}: " + header.encode(splitchars=splitchars, maxlinelen=width, linesep="\n")


def _fits(folded: str) -> str | None:
    """``folded`` if every line fits in 78 columns and the first holds some of the value, else ``None``."""
    lines = folded.split("\n")
    if lines[0].endswith(": ") or any(len(line) > LINE for line in lines):
        return None
    return folded


def _modern(name: str, value: str, utf8: bool) -> str:
    policy = _MODERN[utf8]
    folded: str = policy.header_factory(name, value).fold(policy=policy)
    return folded.removesuffix("\n")
