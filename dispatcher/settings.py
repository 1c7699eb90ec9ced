"""Settings read from the environment, each checked once at start-up with an error naming the variable.

Routes live only here, on the workers: ``SMTP_URL`` is the route ``default``; ``SMTP_URL_<NAME>`` adds
the route ``<name>`` (lower-cased). A job names a route, never credentials.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from dispatcher.errors import ConfigurationError
from dispatcher.smtp.config import SmtpConfig, parse_smtp_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ROUTE_PREFIX = "SMTP_URL_"


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, capped; bounded by attempts and by age. See the README table."""

    base_delay: float = 60.0
    max_delay: float = 3600.0
    max_attempts: int = 8
    max_age: float = 2 * 86400.0
    resend_unknown: bool = False


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    routes: Mapping[str, SmtpConfig] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = 25 * 1024 * 1024
    lease_seconds: float = 30.0
    job_timeout_margin: float = 60.0

    def route(self, name: str) -> SmtpConfig:
        try:
            return self.routes[name]
        except KeyError:
            known = ", ".join(sorted(self.routes)) or "none"
            raise ConfigurationError(
                f"route {name!r} is not configured on this worker (known: {known})"
            ) from None

    def job_timeout(self) -> float:
        """Every job's wall-time bound: the slowest route's stage deadlines summed, plus a margin."""
        longest = max((config.timeouts.longest_send() for config in self.routes.values()), default=0.0)
        return longest + self.job_timeout_margin


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name}={raw!r}: expected a number") from None
    if value < minimum:
        raise ConfigurationError(f"{name}={raw!r}: must be at least {minimum:g}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigurationError(f"{name}={raw!r}: expected true or false")


def read_routes(env: Mapping[str, str]) -> dict[str, SmtpConfig]:
    routes: dict[str, SmtpConfig] = {}
    for name, value in env.items():
        if name == "SMTP_URL":
            route = "default"
        elif name.startswith(ROUTE_PREFIX) and len(name) > len(ROUTE_PREFIX):
            route = name[len(ROUTE_PREFIX) :].lower()
        else:
            continue
        try:
            routes[route] = parse_smtp_url(value)
        except ConfigurationError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None
    return routes


def load_settings(env: Mapping[str, str] | None = None, *, need_routes: bool = False) -> Settings:
    """Read every setting. ``need_routes`` (workers): refuse to start without ``SMTP_URL``, never guess."""
    env = os.environ if env is None else env
    routes = read_routes(env)
    if need_routes and "default" not in routes:
        raise ConfigurationError(
            "SMTP_URL is not set: a worker needs its default route, e.g. SMTP_URL=smtp+starttls://user:pass@host"
        )
    retry = RetryPolicy(
        base_delay=_number(env, "DISPATCH_RETRY_BASE", 60.0),
        max_delay=_number(env, "DISPATCH_RETRY_MAX_DELAY", 3600.0),
        max_attempts=int(_number(env, "DISPATCH_RETRY_MAX_ATTEMPTS", 8, minimum=1)),
        max_age=_number(env, "DISPATCH_RETRY_MAX_AGE", 2 * 86400.0),
        resend_unknown=_flag(env, "DISPATCH_RESEND_UNKNOWN", False),
    )
    return Settings(
        redis_url=env.get("REDIS_URL") or DEFAULT_REDIS_URL,
        routes=routes,
        retry=retry,
        max_message_bytes=int(_number(env, "DISPATCH_MAX_MESSAGE_BYTES", 25 * 1024 * 1024, minimum=1024)),
        lease_seconds=_number(env, "DISPATCH_LEASE_SECONDS", 30.0, minimum=2.0),
        job_timeout_margin=_number(env, "DISPATCH_JOB_TIMEOUT_MARGIN", 60.0, minimum=1.0),
    )
