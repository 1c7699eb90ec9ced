"""Dashboard settings from the environment and the command line, checked once before anything listens.

Credentials are required by default. Running without them ("open") must be asked for explicitly
(``--insecure-open`` or ``DISPATCH_DASHBOARD_OPEN=1``) and is refused on any address but loopback: an open
dashboard can retry and delete mail, so it must never be reachable from another machine. In every mode the
app answers only to the Host names of ``allowed_hosts`` (``DISPATCH_DASHBOARD_HOSTS``; see ``hosts``).
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

from dispatcher.errors import ConfigurationError
from dispatcher.mail.limits import MAX_RECIPIENTS
from dispatcher.mail.message import DEFAULT_MAX_BYTES
from dispatcher.settings import DEFAULT_REDIS_URL
from dispatcher.values import parse_flag, parse_number, parse_redis_url

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8025
DEFAULT_MAX_REQUEST_BYTES = 30 * 1024 * 1024
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
_HOST = re.compile(r"(?P<name>\[[0-9a-f:.]+\]|[a-z0-9_.-]+)(?::(?P<port>[0-9]{1,5}))?")
_WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def split_host(value: str) -> tuple[str, int | None] | None:
    """``"Example.COM.:8025"`` → ``("example.com", 8025)``; ``None`` if it is no host[:port]."""
    match = _HOST.fullmatch(value.strip().lower())
    if match is None:
        return None
    port = match["port"]
    if port is not None and not 0 < int(port) <= 65535:
        return None
    return match["name"].rstrip(".") or match["name"], int(port) if port is not None else None


def parse_allowed_hosts(raw: str) -> tuple[str, ...]:
    """``DISPATCH_DASHBOARD_HOSTS``: ``name`` (any port) or ``name:port``, comma-separated."""
    entries = tuple(entry.strip().lower() for entry in raw.split(",") if entry.strip())
    if not entries:
        raise ConfigurationError("DISPATCH_DASHBOARD_HOSTS is empty: name the hosts the dashboard answers to")
    for entry in entries:
        if split_host(entry) is None:
            raise ConfigurationError(
                f"DISPATCH_DASHBOARD_HOSTS: {entry!r} is not a host name or address with an optional "
                "port (e.g. dash.example.com, 10.0.0.5:8025, [::1]); wildcards are not supported"
            )
    return entries


def default_hosts(bind_host: str) -> tuple[str, ...]:
    """Loopback names, plus the address the server was told to bind when it is a specific one."""
    bound = bind_host.strip().lower()
    if bound in _WILDCARD_BINDS or bound in LOOPBACK_HOSTS:
        return LOOPBACK_HOSTS
    if ":" in bound and not bound.startswith("["):
        bound = f"[{bound}]"  # an IPv6 address as it appears in a Host header
    return (*LOOPBACK_HOSTS, bound) if split_host(bound) is not None else LOOPBACK_HOSTS


def is_loopback(host: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1. Names other than localhost are not resolved: refuse them."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class DashboardConfig:
    """Everything the app needs; the constructor refuses an unsafe combination (see the module doc)."""

    redis_url: str = DEFAULT_REDIS_URL
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    open_access: bool = False
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    api_token: str | None = field(default=None, repr=False)
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_message_bytes: int = DEFAULT_MAX_BYTES
    max_recipients: int = MAX_RECIPIENTS
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    secure_cookie: bool = False
    allowed_hosts: tuple[str, ...] = ()
    """Host names (``name`` or ``name:port``) requests may carry; empty: ``default_hosts(host)``."""

    def __post_init__(self) -> None:
        if not self.allowed_hosts:
            object.__setattr__(self, "allowed_hosts", default_hosts(self.host))
        for entry in self.allowed_hosts:
            if split_host(entry) is None:
                raise ConfigurationError(f"allowed host {entry!r} is not a host name or address")
        if bool(self.user) != bool(self.password):
            raise ConfigurationError(
                "set both DISPATCH_DASHBOARD_USER and DISPATCH_DASHBOARD_PASSWORD, or neither"
            )
        if not self.auth_required:
            if not self.open_access:
                raise ConfigurationError(
                    "the dashboard needs DISPATCH_DASHBOARD_USER and DISPATCH_DASHBOARD_PASSWORD; "
                    "to run it without a login on loopback only, pass --insecure-open "
                    "(or DISPATCH_DASHBOARD_OPEN=1)"
                )
            if not is_loopback(self.host):
                raise ConfigurationError(
                    f"refusing to run open (no login) on {self.host!r}: open mode is for loopback only "
                    "(--host 127.0.0.1); set DISPATCH_DASHBOARD_USER and DISPATCH_DASHBOARD_PASSWORD"
                )
        if self.api_token is not None and len(self.api_token) < 16:
            raise ConfigurationError("DISPATCH_API_TOKEN must be at least 16 characters")
        if self.max_request_bytes < 1024:
            raise ConfigurationError("DISPATCH_API_MAX_BYTES must be at least 1024")
        if not 0 <= self.port <= 65535:
            raise ConfigurationError(f"port {self.port} is out of range")

    @property
    def auth_required(self) -> bool:
        return bool(self.user and self.password)


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name, "")
    return bool(raw.strip()) and parse_flag(name, raw)


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "")
    return default if not raw.strip() else int(parse_number(name, raw, integer=True))


def load_config(
    env: Mapping[str, str], *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, insecure_open: bool = False
) -> DashboardConfig:
    """Read ``DISPATCH_DASHBOARD_*``, ``DISPATCH_API_*``, ``REDIS_URL``; ``ConfigurationError`` if unsafe.

    ``DISPATCH_DASHBOARD_HOSTS`` replaces the default allow-list of Host names (see ``hosts``)."""
    secret = env.get("DISPATCH_DASHBOARD_SECRET") or ""
    hosts = env.get("DISPATCH_DASHBOARD_HOSTS") or ""
    return DashboardConfig(
        redis_url=parse_redis_url("REDIS_URL", env.get("REDIS_URL") or DEFAULT_REDIS_URL),
        user=env.get("DISPATCH_DASHBOARD_USER") or None,
        password=env.get("DISPATCH_DASHBOARD_PASSWORD") or None,
        open_access=insecure_open or _flag(env, "DISPATCH_DASHBOARD_OPEN"),
        secret_key=secret.encode() if secret else secrets.token_bytes(32),
        api_token=env.get("DISPATCH_API_TOKEN") or None,
        max_request_bytes=_int(env, "DISPATCH_API_MAX_BYTES", DEFAULT_MAX_REQUEST_BYTES),
        max_message_bytes=_int(env, "DISPATCH_MAX_MESSAGE_BYTES", DEFAULT_MAX_BYTES),
        max_recipients=_int(env, "DISPATCH_MAX_RECIPIENTS", MAX_RECIPIENTS),
        host=host,
        port=port,
        secure_cookie=_flag(env, "DISPATCH_DASHBOARD_SECURE_COOKIE"),
        allowed_hosts=parse_allowed_hosts(hosts) if hosts else (),
    )
