"""SMTP AUTH (RFC 4954): SASL PLAIN, LOGIN and XOAUTH2 encoders and a sans-IO exchange.

The secret appears only in the bytes handed to the connection: never in a repr, an error message or a
transcript line (``redacted``). Whether AUTH may run at all (TLS first) is the caller's policy.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field

from dispatcher.errors import (
    AuthenticationFailed,
    InvalidCommandArgument,
    PolicyError,
    ProtocolError,
    ServiceClosing,
)
from dispatcher.smtp import commands
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

SUPPORTED_MECHANISMS = frozenset({"PLAIN", "LOGIN", "XOAUTH2"})
PREFERRED_MECHANISMS = ("PLAIN", "LOGIN")
"""Tried in this order when the route forces none. XOAUTH2 needs a token, so it is used only when forced."""

REDACTED = "<redacted>"
_DETAILS_CHARS = 200


@dataclass(frozen=True, slots=True)
class Credentials:
    """A username and its password or OAuth2 access token; ``mechanism`` forces one SASL mechanism."""

    username: str
    secret: str = field(repr=False)
    mechanism: str | None = None

    def __post_init__(self) -> None:
        if self.mechanism is not None:
            object.__setattr__(self, "mechanism", self.mechanism.upper())

    def __repr__(self) -> str:
        forced = f", mechanism={self.mechanism!r}" if self.mechanism is not None else ""
        return f"Credentials(username={self.username!r}, secret={REDACTED}{forced})"

    def __str__(self) -> str:
        return self.__repr__()


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _refuse_separator(credentials: Credentials, separator: str, mechanism: str) -> None:
    if separator in credentials.username or separator in credentials.secret:
        raise InvalidCommandArgument(
            f"{mechanism} credentials must not contain U+{ord(separator):04X}",
            stage=Stage.AUTH,
            transient=False,
            route_level=True,
        )


def plain_initial_response(credentials: Credentials) -> str:
    """RFC 4616 message with an empty authorization identity: base64 of ``\\0user\\0secret``."""
    _refuse_separator(credentials, "\0", "PLAIN")
    return _b64(f"\0{credentials.username}\0{credentials.secret}")


def login_username(credentials: Credentials) -> str:
    return _b64(credentials.username)


def login_password(credentials: Credentials) -> str:
    return _b64(credentials.secret)


def xoauth2_initial_response(credentials: Credentials) -> str:
    """Google/Microsoft XOAUTH2: base64 of ``user=U\\x01auth=Bearer T\\x01\\x01``."""
    _refuse_separator(credentials, "\x01", "XOAUTH2")
    return _b64(f"user={credentials.username}\x01auth=Bearer {credentials.secret}\x01\x01")


def choose_mechanism(offered: frozenset[str], credentials: Credentials) -> str:
    """The forced mechanism if the server offers it, else the first of PLAIN, LOGIN it offers."""
    offered_upper = frozenset(mechanism.upper() for mechanism in offered)
    listing = ", ".join(sorted(offered_upper)) or "none"
    forced = credentials.mechanism
    if forced is not None:
        if forced not in SUPPORTED_MECHANISMS:
            raise PolicyError(
                f"AUTH mechanism {forced} is not supported by this client "
                f"(supported: {', '.join(sorted(SUPPORTED_MECHANISMS))})",
                stage=Stage.AUTH,
                route_level=True,
            )
        if forced not in offered_upper:
            raise PolicyError(
                f"AUTH mechanism {forced} is required but the server offers: {listing}",
                stage=Stage.AUTH,
                route_level=True,
            )
        return forced
    for mechanism in PREFERRED_MECHANISMS:
        if mechanism in offered_upper:
            return mechanism
    raise PolicyError(
        f"no usable AUTH mechanism; the server offers: {listing} "
        f"(this client uses {', '.join(PREFERRED_MECHANISMS)}, or XOAUTH2 when forced)",
        stage=Stage.AUTH,
        route_level=True,
    )


def _redact_continuation(text: str) -> str:
    return text if text in ("", "*") else REDACTED


def redact_auth_line(line: bytes) -> str:
    """A client AUTH line fit for transcripts: ``AUTH PLAIN <redacted>``, ``AUTH LOGIN``, ``<redacted>``."""
    text = line.decode("utf-8", errors="replace").rstrip("\r\n")
    parts = text.split(" ")
    if parts[0].upper() != "AUTH":
        return _redact_continuation(text)
    if len(parts) > 2:
        return f"AUTH {parts[1]} {REDACTED}"
    return text


class AuthExchange:
    """One AUTH dialogue without I/O: ``start()`` gives the first line, ``receive(reply)`` the next one
    (or None once the server said 235), raising when the server refuses.

    XOAUTH2 failures arrive as a 334 whose text is a base64 JSON error; the client must answer with an
    empty line and then gets the real failure reply. The JSON is kept in ``error_details``.
    """

    def __init__(self, mechanism: str, credentials: Credentials) -> None:
        mechanism = mechanism.upper()
        if mechanism not in SUPPORTED_MECHANISMS:
            raise PolicyError(
                f"AUTH mechanism {mechanism} is not supported by this client",
                stage=Stage.AUTH,
                route_level=True,
            )
        self.mechanism = mechanism
        self._credentials = credentials
        self._start_line: bytes | None = None
        self._challenges = 0
        self._done = False
        self._over = False
        self.error_details: str | None = None

    def __repr__(self) -> str:
        state = "done" if self._done else "over" if self._over else "started" if self._start_line else "new"
        return f"<AuthExchange {self.mechanism} user={self._credentials.username!r} {state}>"

    @property
    def done(self) -> bool:
        """True once the server accepted the credentials (235)."""
        return self._done

    def start(self) -> bytes:
        if self._start_line is not None:
            raise ProtocolError("AUTH exchange already started", stage=Stage.AUTH)
        if self.mechanism == "PLAIN":
            line = commands.auth("PLAIN", plain_initial_response(self._credentials))
        elif self.mechanism == "XOAUTH2":
            line = commands.auth("XOAUTH2", xoauth2_initial_response(self._credentials))
        else:
            line = commands.auth("LOGIN")
        self._start_line = line
        return line

    def receive(self, reply: Reply) -> bytes | None:
        if self._start_line is None or self._over:
            raise ProtocolError("no AUTH reply expected now", stage=Stage.AUTH, reply=reply)
        try:
            return self._next_line(reply)
        except Exception:
            self._over = True
            raise

    def _next_line(self, reply: Reply) -> bytes | None:
        if reply.code == 235:
            self._done = True
            self._over = True
            return None
        if reply.code == 421:
            raise ServiceClosing("service closing during AUTH", stage=Stage.AUTH, reply=reply)
        if reply.is_transient or reply.is_permanent:
            message = "authentication failed"
            if self.error_details:
                message += f" (XOAUTH2 error {self.error_details})"
            raise AuthenticationFailed(message, stage=Stage.AUTH, reply=reply)
        if reply.code != 334:
            raise ProtocolError("unexpected reply to AUTH", stage=Stage.AUTH, reply=reply)
        self._challenges += 1
        if self.mechanism == "LOGIN" and self._challenges == 1:
            return commands.sasl_response(login_username(self._credentials))
        if self.mechanism == "LOGIN" and self._challenges == 2:
            return commands.sasl_response(login_password(self._credentials))
        if self.mechanism == "XOAUTH2" and self._challenges == 1:
            self.error_details = _decode_challenge(reply.text)
            return commands.sasl_response("")
        raise ProtocolError(
            f"unexpected 334 challenge in AUTH {self.mechanism}", stage=Stage.AUTH, reply=reply
        )

    def redacted(self, line: bytes) -> str:
        """``line`` (one this exchange produced) as it may appear in a transcript."""
        if line == self._start_line:
            return redact_auth_line(line)
        return _redact_continuation(line.decode("utf-8", errors="replace").rstrip("\r\n"))


def _decode_challenge(text: str) -> str:
    try:
        decoded = base64.b64decode(text.strip(), validate=False).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        decoded = text
    printable = "".join(ch for ch in decoded if ch.isprintable())
    return printable[:_DETAILS_CHARS]
