"""What the server said it supports: the EHLO reply (RFC 5321 §4.1.1.1) as an immutable value.

After STARTTLS the value must be thrown away and EHLO sent again (RFC 3207 §4.2): servers commonly
offer AUTH only inside TLS and stop offering STARTTLS there.
"""

from __future__ import annotations

from dataclasses import dataclass

from dispatcher.smtp.replies import Reply


@dataclass(frozen=True, slots=True)
class Extensions:
    """``keywords`` keep the server's order; each is (UPPERCASE keyword, parameter string).

    The old ``AUTH=LOGIN PLAIN`` form is stored as keyword ``AUTH`` like the standard form, so a keyword
    may appear twice; ``params`` returns the first, ``auth_mechanisms`` unites all.
    """

    greeting: str
    keywords: tuple[tuple[str, str], ...] = ()

    @classmethod
    def none(cls, greeting: str = "") -> Extensions:
        """What a server that only answered HELO supports: nothing."""
        return cls(greeting=greeting, keywords=())

    def has(self, keyword: str) -> bool:
        wanted = keyword.upper()
        return any(name == wanted for name, _ in self.keywords)

    def params(self, keyword: str) -> str | None:
        wanted = keyword.upper()
        for name, params in self.keywords:
            if name == wanted:
                return params
        return None

    @property
    def size_limit(self) -> int | None:
        """The SIZE limit in octets (RFC 1870); None when absent, unparsable or 0 (no fixed limit)."""
        params = self.params("SIZE")
        if not params:
            return None
        first = params.split()[0]
        if not first.isascii() or not first.isdigit():
            return None
        limit = int(first)
        return limit if limit > 0 else None

    @property
    def auth_mechanisms(self) -> frozenset[str]:
        return frozenset(
            mechanism.upper()
            for name, params in self.keywords
            if name == "AUTH"
            for mechanism in params.split()
        )

    @property
    def pipelining(self) -> bool:
        return self.has("PIPELINING")

    @property
    def starttls(self) -> bool:
        return self.has("STARTTLS")

    @property
    def eightbitmime(self) -> bool:
        return self.has("8BITMIME")

    @property
    def smtputf8(self) -> bool:
        return self.has("SMTPUTF8")

    @property
    def enhanced_status_codes(self) -> bool:
        return self.has("ENHANCEDSTATUSCODES")

    @property
    def chunking(self) -> bool:
        return self.has("CHUNKING")

    @property
    def binarymime(self) -> bool:
        return self.has("BINARYMIME")

    @property
    def dsn(self) -> bool:
        return self.has("DSN")


def _keyword_line(line: str) -> tuple[str, str] | None:
    stripped = line.strip()
    if not stripped:
        return None
    token, _, rest = stripped.partition(" ")
    name, equals, old_style_params = token.partition("=")
    if not name:
        return None
    if equals:
        rest = f"{old_style_params} {rest}"
    return name.upper(), " ".join(rest.split())


def parse_ehlo(reply: Reply) -> Extensions:
    """Read a 250 EHLO reply. The caller checks the code; lines that name no keyword are skipped."""
    keywords = tuple(kw for kw in (_keyword_line(line) for line in reply.lines[1:]) if kw is not None)
    return Extensions(greeting=reply.lines[0], keywords=keywords)
