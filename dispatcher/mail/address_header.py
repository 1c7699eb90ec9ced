"""Address headers (From, To, Cc, Reply-To) written by us, folded, in time linear in their length.

The email package folds a header of addresses by parsing it into a token tree and refolding it, and a
non-ASCII display name costs it about half a millisecond per character (every token re-decodes and
re-encodes the tail of its line): 1,000 recipients with 200-character names in To took 80 s to build, on
every attempt. A mailbox list needs none of that — each ``Address`` is already validated — so
:func:`folded` writes the value itself: display names as they are (quoted by ``Address.formatted``'s
rule) when they are ASCII or the message is SMTPUTF8 (RFC 6532), else as RFC 2047 ``B`` encoded words of
UTF-8, at most 75 characters each, split between characters (RFC 2047 §5); tokens joined by one space and
folded before a token that would pass 78 columns (RFC 5322 §2.2.3). ``compose`` stores the value with
``set_raw`` as a ``header_fold.Prefolded``, written as it is, and ``check_written`` checks the written
lines as for every header.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dispatcher.mail.addresses import Address

LINE = 78  # RFC 5322 §2.1.1: SHOULD be no more than 78 characters, excluding the CRLF
_EW_BYTES = 45  # 45 bytes of UTF-8 are 60 of base64: "=?utf-8?b?" + 60 + "?=" = 72 <= 75 (RFC 2047 §2)


def folded(name: str, addresses: Sequence[Address], *, utf8: bool) -> str:
    """The value of header ``name`` listing ``addresses``, folded: lines joined by LF, each continuation
    line starting with a space (the email package writes each line ending with its CRLF)."""
    lines: list[str] = []
    line = ""
    width = len(name) + 2  # "To: "
    for token in _tokens(addresses, utf8):
        if not line:
            line = token
        elif width + len(line) + 1 + len(token) <= LINE:
            line += " " + token
        else:
            lines.append(line)
            line, width = " " + token, 0
    lines.append(line)
    return "\n".join(lines)


def _tokens(addresses: Sequence[Address], utf8: bool) -> Iterator[str]:
    last = len(addresses) - 1
    for index, address in enumerate(addresses):
        comma = "," if index < last else ""
        if not address.display_name:
            yield address.addr_spec + comma
            continue
        yield from _name_tokens(address, utf8)
        yield f"<{address.addr_spec}>{comma}"


def _name_tokens(address: Address, utf8: bool) -> Iterator[str]:
    name = address.display_name
    if not utf8 and not name.isascii():
        yield from _encoded_words(name)
        return
    written = address.formatted()[: -len(address.addr_spec) - 3]  # 'Name' or '"quoted"', without ' <…>'
    if written.startswith('"'):
        yield written  # folding inside a quoted string is allowed, but one token keeps it simple
    else:
        yield from written.split(" ")


def _encoded_words(text: str) -> Iterator[str]:
    chunk: list[str] = []
    size = 0
    for char in text:
        length = len(char.encode("utf-8"))
        if size + length > _EW_BYTES:
            yield _word("".join(chunk))
            chunk, size = [], 0
        chunk.append(char)
        size += length
    if chunk:
        yield _word("".join(chunk))


def _word(text: str) -> str:
    return "=?utf-8?b?" + base64.b64encode(text.encode("utf-8")).decode("ascii") + "?="
