"""Email addresses: one strict parser, one frozen value.

``email.utils.parseaddr`` is lenient: it returns ``('', '')`` or a half-parsed pair for garbage and happily
accepts two addresses glued together. We parse ``addr@example.com`` and ``Name <addr@example.com>``
ourselves, reject anything doubtful with a precise sentence, and then check that the stdlib header parser
reads back exactly the address we validated, so what we put in the headers is what we checked.

An address must pass :func:`dispatcher.mail.header_text.header_text_problem` (no control characters, also
not in what an RFC 2047 encoded word in it decodes to) before it is parsed.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from email import policy as email_policy
from email.errors import NonASCIILocalPartDefect

from dispatcher.mail.header_text import control_character_problem, header_text_problem
from dispatcher.mail.limits import MAX_DISPLAY_NAME_CHARS
from dispatcher.smtp.commands import MAX_ADDRESS_OCTETS

__all__ = ["Address", "control_character_problem", "header_text_problem", "parse_address"]

MAX_LOCAL_OCTETS = 64  # RFC 5321 §4.5.3.1.1
MAX_DOMAIN_OCTETS = 253
MAX_LABEL_OCTETS = 63

# RFC 5322 atext; any non-ASCII character is atext too (RFC 6532 §3.2).
_ATEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
# RFC 5322 specials: a display name containing one of these must be quoted.
_SPECIALS = frozenset('()<>[]:;@\\,."')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
# ASCII dot-atom local part at an LDH domain, and a display name of plain words: read back unchanged.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDR_SPEC = re.compile(rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_ATOM_TEXT = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+")
_PLAIN_NAME = re.compile(r"(?:[A-Za-z0-9]+(?: [A-Za-z0-9]+)*)?")
# The whole common shape in one match: ``local@domain`` or ``Plain Name <local@domain>``, a dot-atom local
# part and LDH labels of 1 to 63 characters (what ``_check_domain`` allows, checked by the pattern).
_LDH = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_ADDRESS = re.compile(
    rf"(?:(?P<name>[A-Za-z0-9]+(?: [A-Za-z0-9]+)*) <)?"
    rf"(?P<spec>(?P<local>{_ATOM}(?:\.{_ATOM})*)@(?P<domain>(?:{_LDH}\.)*{_LDH}))(?(name)>)"
)


@dataclass(frozen=True, slots=True)
class Address:
    """One mailbox: an optional display name and the ``local@domain`` addr-spec used in the envelope."""

    display_name: str
    addr_spec: str

    @property
    def local(self) -> str:
        return self.addr_spec.rpartition("@")[0]

    @property
    def domain(self) -> str:
        return self.addr_spec.rpartition("@")[2]

    @property
    def is_ascii(self) -> bool:
        """False when the addr-spec needs SMTPUTF8 (RFC 6531); a non-ASCII display name does not."""
        return self.addr_spec.isascii()

    def formatted(self) -> str:
        """Header form, ``Name <local@domain>`` or bare ``local@domain``; Unicode left as is.

        The email package encodes a non-ASCII display name (RFC 2047) when the header is written;
        :func:`parse_address` reads this form back into an equal ``Address``.
        """
        if not self.display_name:
            return self.addr_spec
        name = self.display_name
        if not _SPECIALS.isdisjoint(name) or name != name.strip() or "  " in name:
            name = _quote(name)
        return f"{name} <{self.addr_spec}>"


def parse_address(value: str) -> Address:
    """Parse exactly one address, ``addr@example.com`` or ``Name <addr@example.com>``.

    Raises ``ValueError`` whose message is a short sentence naming the problem.
    """
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if type(value) is not str or len(value) > _LONGEST_ACCEPTED:
        return _parse(value)  # a str subclass may compare oddly, a long value is refused at once: no cache
    known = _KNOWN.get(value)
    if known is None:
        try:
            known = _parse(value)
        except ValueError as exc:
            known = str(exc)
        if len(_KNOWN) >= _KNOWN_MAX:
            _KNOWN.clear()
        _KNOWN[value] = known
    if isinstance(known, str):
        raise ValueError(known)
    return known


_LONGEST_ACCEPTED = MAX_DISPLAY_NAME_CHARS + MAX_ADDRESS_OCTETS + 8
"""Characters of the longest address ``_parsed_address`` does not refuse for its length alone."""
_KNOWN: dict[str, Address | str] = {}
"""``parse_address``'s answers by value: the ``Address``, or the message of the ``ValueError`` it raised.
The parse depends on nothing but the text and ``Address`` is frozen, so an answer is good for every later
call (bulk enqueue repeats its sender on every mail). Bounded: emptied when ``_KNOWN_MAX`` are held."""
_KNOWN_MAX = 1024


def _parse(value: str) -> Address:
    plain = _plain_address(value)
    if plain is not None:
        return plain
    return _parsed_address(value)


def _plain_address(value: str) -> Address | None:
    """``value`` as an ``Address`` when it has the common plain shape, pure ASCII, and every limit holds:
    exactly what ``_parsed_address`` returns for it (``tests/test_addresses.py`` holds the two to that),
    in one regex match instead of a walk through the parts. ``None``: anything else, for the strict path.
    """
    if len(value) > MAX_DISPLAY_NAME_CHARS + MAX_ADDRESS_OCTETS + 3 or "=?" in value:
        return None  # too long to be right (the strict path says why), or it may hold an encoded word
    match = _PLAIN_ADDRESS.fullmatch(value)
    if match is None:
        return None
    name, spec, local, domain = match.group("name", "spec", "local", "domain")
    if (
        len(local) > MAX_LOCAL_OCTETS
        or len(domain) > MAX_DOMAIN_OCTETS
        or len(spec) > MAX_ADDRESS_OCTETS
        or (name is not None and len(name) > MAX_DISPLAY_NAME_CHARS)
        or domain.rpartition(".")[2].isdigit()
    ):
        return None
    return Address(display_name=name or "", addr_spec=spec)


def _parsed_address(value: str) -> Address:
    """The strict parser: every form ``parse_address`` takes, a precise sentence for every problem."""
    if len(value) > _LONGEST_ACCEPTED:  # '"name" <addr>' and some spaces
        raise ValueError(f"too long: {len(value)} characters for one address")
    problem = header_text_problem(value)
    if problem is not None:
        raise ValueError(problem)
    text = value.strip()
    if not text:
        raise ValueError("empty")
    angle_start = _find_unquoted(text, "<")
    if angle_start is None:
        if _find_unquoted(text, ">") is not None:
            raise ValueError("not an email address: '>' without '<'")
        display_name, addr_spec = "", text
    else:
        if not text.endswith(">"):
            raise ValueError("not an email address: text after '>'")
        display_name = _parse_display_name(text[:angle_start].strip())
        if len(display_name) > MAX_DISPLAY_NAME_CHARS:
            limit = MAX_DISPLAY_NAME_CHARS
            raise ValueError(f"display name too long: {len(display_name)} characters, the limit is {limit}")
        addr_spec = text[angle_start + 1 : -1].strip()
        if _find_unquoted(addr_spec, "<") is not None or _find_unquoted(addr_spec, ">") is not None:
            raise ValueError("not an email address: stray '<' or '>'")
    addr_spec = _check_addr_spec(addr_spec)
    address = Address(display_name=display_name, addr_spec=addr_spec)
    if _PLAIN_ADDR_SPEC.fullmatch(addr_spec) and _PLAIN_NAME.fullmatch(display_name):
        return address  # the common shape: the stdlib reads it back unchanged (tested), skip that cost
    return _stdlib_reading(address)


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _find_unquoted(text: str, target: str) -> int | None:
    """Index of the first ``target`` outside a quoted string (backslash escapes honoured)."""
    if '"' not in text:
        found = text.find(target)
        return None if found < 0 else found
    in_quotes = False
    escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif char == "\\" and in_quotes:
            escaped = True
        elif char == '"':
            in_quotes = not in_quotes
        elif char == target and not in_quotes:
            return index
    return None


def _unquote(quoted: str) -> str:
    """Contents of a complete quoted string ``"..."``; raises if it is not one."""
    if len(quoted) < 2 or not (quoted.startswith('"') and quoted.endswith('"')):
        raise ValueError("unbalanced quotes")
    out: list[str] = []
    escaped = False
    for char in quoted[1:-1]:
        if escaped:
            out.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            raise ValueError("unbalanced quotes")
        else:
            out.append(char)
    if escaped:
        raise ValueError("unbalanced quotes")
    return "".join(out)


def _parse_display_name(text: str) -> str:
    if not text:
        return ""
    if text.startswith('"'):
        try:
            return _unquote(text)
        except ValueError:
            raise ValueError("display name: unbalanced quotes") from None
    if "," in text or ";" in text:
        raise ValueError("exactly one address expected; use a list for several")
    bad = sorted({char for char in text if char in _SPECIALS and char != "."})
    if bad:
        raise ValueError(f"display name: special character {bad[0]!r} must be quoted")
    return text


def _check_addr_spec(addr_spec: str) -> str:
    if "@" not in addr_spec:
        raise ValueError("not an email address: no '@'")
    if "," in addr_spec and addr_spec.count("@") > 1 and not addr_spec.startswith('"'):
        raise ValueError("exactly one address expected; use a list for several")
    local, _, domain = addr_spec.rpartition("@")
    _check_local(local)
    domain = _check_domain(domain)
    result = f"{local}@{domain}"
    if len(result.encode("utf-8")) > MAX_ADDRESS_OCTETS:
        raise ValueError(f"too long: more than {MAX_ADDRESS_OCTETS} octets")
    return result


def _check_local(local: str) -> None:
    if not local:
        raise ValueError("not an email address: nothing before '@'")
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise ValueError(f"local part too long: more than {MAX_LOCAL_OCTETS} octets")
    if local.startswith('"'):
        try:
            _unquote(local)
        except ValueError:
            raise ValueError("local part: unbalanced quotes") from None
        return
    if "@" in local:
        raise ValueError("not an email address: more than one '@'")
    plain = _ATOM_TEXT.fullmatch(local) is not None  # ASCII atext and dots: no character to look at
    if not plain and _has_white_space(local):
        raise ValueError("local part contains whitespace")
    if local.startswith(".") or local.endswith(".") or ".." in local:
        raise ValueError("local part: misplaced '.' (leading, trailing or doubled)")
    for char in () if plain else local:
        if char != "." and char.isascii() and char not in _ATEXT:
            raise ValueError(f"local part: character {char!r} is not allowed unquoted")


def _has_white_space(text: str) -> bool:
    """Any character ``str.isspace`` calls white space in ``text`` (one C call, not one per character)."""
    return text.split() != [text]


def _check_domain(domain: str) -> str:
    if not domain:
        raise ValueError("not an email address: nothing after '@'")
    if domain.startswith("["):
        return _check_address_literal(domain)
    if _has_white_space(domain):
        raise ValueError("domain contains whitespace")
    if domain.endswith("."):
        raise ValueError("domain ends with '.'")
    for label in domain.split("."):
        if not label:
            raise ValueError("domain: empty label (leading or doubled '.')")
        if len(label.encode("utf-8")) > MAX_LABEL_OCTETS and label.isascii():
            raise ValueError(f"domain label too long: more than {MAX_LABEL_OCTETS} octets")
    try:  # an ASCII name is its own IDNA form (the codec's fast path, without the codec's cost)
        ascii_domain = domain if domain.isascii() else domain.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValueError(f"domain {domain!r} is not a valid (IDNA) domain name") from None
    if len(ascii_domain) > MAX_DOMAIN_OCTETS:
        raise ValueError(f"domain too long: more than {MAX_DOMAIN_OCTETS} octets")
    labels = ascii_domain.split(".")
    for label in labels:
        if not _LDH_LABEL.fullmatch(label):
            raise ValueError(f"domain label {label!r}: only letters, digits and inner hyphens are allowed")
    if labels[-1].isdigit():
        raise ValueError("domain: an IP address must be written in brackets, e.g. [192.0.2.1]")
    return domain


def _check_address_literal(domain: str) -> str:
    if not domain.endswith("]"):
        raise ValueError("domain: address literal without closing ']'")
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
            return f"[IPv6:{inner[5:]}]"
        ipaddress.IPv4Address(inner)
    except ValueError:
        raise ValueError(f"domain: {domain!r} is not an IPv4 or IPv6 address literal") from None
    return domain


def _stdlib_reading(address: Address) -> Address:
    """Read ``address.formatted()`` back with the email package: exactly this mailbox, defect-free.

    Returns the stdlib's canonical form: needless quotes around a local part dropped, RFC 2047
    encoded-words in a display name decoded (then checked again for control characters).
    """
    try:
        header = email_policy.SMTPUTF8.header_factory("To", address.formatted())
    except (ValueError, IndexError, TypeError) as exc:  # the stdlib parser's failures are undocumented
        raise ValueError(f"not an email address: {exc}") from None
    defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    mailboxes = header.addresses
    if defects or len(mailboxes) != 1:
        raise ValueError(f"not an email address: {defects[0] if defects else 'unreadable'}")
    parsed = mailboxes[0]
    local = address.local
    if local.startswith('"'):
        local = _unquote(local)
    if (parsed.username, parsed.domain) != (local, address.domain):
        raise ValueError("not an email address: ambiguous form")
    display_name = address.display_name
    if "=?" in display_name:
        display_name = parsed.display_name
        problem = control_character_problem(display_name)
        if problem is not None:
            raise ValueError(f"display name {problem}")
    elif parsed.display_name != display_name:
        raise ValueError("display name: ambiguous form")
    return Address(display_name=display_name, addr_spec=parsed.addr_spec)
