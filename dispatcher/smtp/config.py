"""How to reach one SMTP server: parsed from a route URL into an immutable ``SmtpConfig``.

    smtp://[user:pass@]host[:port]          STARTTLS when offered (opportunistic), port 25
    smtp+starttls://[user:pass@]host[:port]  STARTTLS required, port 587
    smtps://[user:pass@]host[:port]          implicit TLS (RFC 8314), port 465

Query options (unknown ones are refused, so a typo never silently weakens a route):
``tls`` (off | opportunistic | required | implicit), ``ca_file``, ``ehlo_name``, ``auth``
(plain | login | xoauth2 — with xoauth2 the password is the bearer token), ``allow_plaintext_auth``,
``insecure_skip_verify`` (turns certificate verification off; for test rigs only),
``timeout`` (every stage) and ``timeout_<stage>`` (one stage, seconds), ``max_messages``, ``max_age``,
``idle_probe`` (seconds idle before a NOOP probe), ``pipelining`` and ``chunking`` (use when offered).
"""

from __future__ import annotations

import dataclasses
import enum
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from dispatcher.errors import ConfigurationError, InvalidCommandArgument
from dispatcher.smtp.auth import Credentials
from dispatcher.smtp.commands import check_ehlo_name
from dispatcher.smtp.stages import Stage
from dispatcher.values import parse_flag, parse_number


class TlsMode(enum.StrEnum):
    OFF = "off"
    OPPORTUNISTIC = "opportunistic"
    REQUIRED = "required"
    IMPLICIT = "implicit"


_SCHEMES = {
    "smtp": (TlsMode.OPPORTUNISTIC, 25),
    "smtp+starttls": (TlsMode.REQUIRED, 587),
    "smtps": (TlsMode.IMPLICIT, 465),
}

_MECHANISMS = ("PLAIN", "LOGIN", "XOAUTH2")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds to wait in each stage. Defaults follow RFC 5321 §4.5.3.2; none may be infinite."""

    connect: float = 30.0
    greeting: float = 300.0
    ehlo: float = 300.0
    starttls: float = 120.0
    auth: float = 120.0
    mail: float = 300.0
    rcpt: float = 300.0
    data: float = 120.0
    data_block: float = 180.0
    data_end: float = 600.0
    rset: float = 60.0
    noop: float = 60.0
    quit: float = 10.0

    def for_stage(self, stage: Stage) -> float:
        name = _STAGE_TIMEOUT.get(stage, stage.value)
        value: float = getattr(self, name)
        return value

    def longest_send(self) -> float:
        """The longest one send() may wait in total on a fresh connection: bounds rq job timeouts."""
        return float(sum(getattr(self, f.name) for f in dataclasses.fields(self)))

    @classmethod
    def uniform(cls, seconds: float) -> Timeouts:
        return cls(**{f.name: seconds for f in dataclasses.fields(cls)})


_STAGE_TIMEOUT = {
    Stage.HELO: "ehlo",
    Stage.TLS_HANDSHAKE: "starttls",
    Stage.BDAT: "data_end",
}


def _default_ehlo_name() -> str:
    name = socket.getfqdn()
    try:
        return check_ehlo_name(name) if "." in name else "localhost"
    except InvalidCommandArgument:
        return "localhost"


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    host: str
    port: int
    tls: TlsMode = TlsMode.OPPORTUNISTIC
    credentials: Credentials | None = None
    ehlo_name: str = field(default_factory=_default_ehlo_name)
    ca_file: str | None = None
    verify_certificates: bool = True
    allow_plaintext_auth: bool = False
    timeouts: Timeouts = field(default_factory=Timeouts)
    max_messages: int = 1000
    max_age: float = 300.0
    idle_probe: float = 30.0
    pipelining: bool = True
    chunking: bool = True

    def tls_context(self) -> ssl.SSLContext:
        """A client context verifying the server against system CAs (or ``ca_file``), TLS 1.2 at least."""
        context = ssl.create_default_context(cafile=self.ca_file)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if not self.verify_certificates:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def redacted_url(self) -> str:
        """The route as a URL a human can read in logs: never the password."""
        scheme = {TlsMode.IMPLICIT: "smtps", TlsMode.REQUIRED: "smtp+starttls"}.get(self.tls, "smtp")
        user = f"{quote(self.credentials.username, safe='')}:***@" if self.credentials else ""
        suffix = "?tls=off" if self.tls is TlsMode.OFF else ""
        return f"{scheme}://{user}{self.host}:{self.port}{suffix}"


def _parse_bool(name: str, value: str) -> bool:
    return parse_flag(f"SMTP URL option {name}", value)


def _parse_seconds(name: str, value: str) -> float:
    return parse_number(f"SMTP URL option {name} (seconds)", value, above=0, maximum=86400)


def parse_smtp_url(url: str) -> SmtpConfig:
    """Parse a route URL into an ``SmtpConfig``; every problem is a ``ConfigurationError`` naming the part."""
    try:
        parts = urlsplit(url)
        port_in_url = parts.port
    except ValueError:
        # urllib's message quotes the part it could not read, which may be a piece of the password.
        raise ConfigurationError(
            "SMTP URL is malformed: its port is not a number from 0 to 65535 — a password holding "
            "'/', '?', '#' or '@' must be percent-encoded (e.g. '/' as %2F)"
        ) from None
    if parts.scheme not in _SCHEMES:
        raise ConfigurationError(
            f"SMTP URL scheme {parts.scheme!r} is not supported; use one of {', '.join(sorted(_SCHEMES))}"
        )
    if not parts.hostname:
        raise ConfigurationError("SMTP URL has no host")
    tls, default_port = _SCHEMES[parts.scheme]
    options: dict[str, Any] = {}
    timeouts: dict[str, float] = {}
    mechanism: str | None = None
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name == "tls":
            try:
                tls = TlsMode(value.lower())
            except ValueError:
                choices = ", ".join(m.value for m in TlsMode)
                raise ConfigurationError(
                    f"SMTP URL option tls={value!r}: expected one of {choices}"
                ) from None
        elif name == "ca_file":
            options["ca_file"] = value
        elif name == "ehlo_name":
            try:
                options["ehlo_name"] = check_ehlo_name(value)
            except InvalidCommandArgument as exc:
                raise ConfigurationError(f"SMTP URL option ehlo_name: {exc.message}") from None
        elif name == "auth":
            mechanism = value.upper()
            if mechanism not in _MECHANISMS:
                raise ConfigurationError(f"SMTP URL option auth={value!r}: expected plain, login or xoauth2")
        elif name == "allow_plaintext_auth":
            options["allow_plaintext_auth"] = _parse_bool(name, value)
        elif name == "insecure_skip_verify":
            options["verify_certificates"] = not _parse_bool(name, value)
        elif name in ("pipelining", "chunking"):
            options[name] = _parse_bool(name, value)
        elif name == "timeout":
            timeouts.update(dict.fromkeys(_timeout_names(), _parse_seconds(name, value)))
        elif name.startswith("timeout_") and name[len("timeout_") :] in _timeout_names():
            timeouts[name[len("timeout_") :]] = _parse_seconds(name, value)
        elif name in ("max_age", "idle_probe"):
            options[name] = _parse_seconds(name, value)
        elif name == "max_messages":
            if not value.isdigit() or int(value) < 1:
                raise ConfigurationError(
                    f"SMTP URL option max_messages={value!r}: expected a positive integer"
                )
            options[name] = int(value)
        else:
            raise ConfigurationError(f"SMTP URL option {name!r} is unknown")
    credentials = None
    if parts.username is not None:
        credentials = Credentials(unquote(parts.username), unquote(parts.password or ""), mechanism)
    elif mechanism is not None:
        raise ConfigurationError("SMTP URL option auth= needs a user name (and password or token) in the URL")
    return SmtpConfig(
        host=parts.hostname,
        port=port_in_url or default_port,
        tls=tls,
        credentials=credentials,
        timeouts=Timeouts(**timeouts),
        **options,
    )


def _timeout_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Timeouts))
