"""Settings read from the environment, each checked once at start-up with an error naming the variable.

Routes live only here, on the workers: ``SMTP_URL`` is the route ``default``; ``SMTP_URL_<NAME>`` adds
the route ``<name>`` (lower-cased). A job names a route, never credentials.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from dispatcher.errors import ConfigurationError, UnknownRoute
from dispatcher.mail.limits import MAX_RECIPIENTS
from dispatcher.mail.message import DEFAULT_MAX_BYTES
from dispatcher.routes.config import RoutePolicy, check_fallbacks, parse_policy, split_route_url
from dispatcher.smtp.config import SmtpConfig, parse_smtp_url
from dispatcher.values import parse_flag, parse_number, parse_redis_url

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
ROUTE_PREFIX = "SMTP_URL_"

#: Every environment variable dispatcher reads: name -> (default, meaning). The README's configuration
#: table and docker-compose.yml are checked against it by the tests.
ENVIRONMENT: dict[str, tuple[str, str]] = {
    "REDIS_URL": (DEFAULT_REDIS_URL, "Redis holding queues, send records and the ledger"),
    "SMTP_URL": (
        "(none: workers refuse to start)",
        "the default route, e.g. smtp+starttls://user:pass@host:587",
    ),
    "SMTP_URL_<NAME>": ("", "an extra route <name> (lower-cased), chosen per mail by its route field"),
    "DISPATCH_CONCURRENCY": ("1", "worker processes per worker.py (same as --concurrency)"),
    "DISPATCH_CONNECTIONS": ("1", "SMTP connections to a route per worker process (same as --connections)"),
    "DISPATCH_RETRY_BASE": ("60", "first retry delay ceiling in seconds; doubles per attempt (full jitter)"),
    "DISPATCH_RETRY_MAX_DELAY": ("3600", "cap on one retry delay, seconds"),
    "DISPATCH_RETRY_MAX_ATTEMPTS": ("8", "attempts per retry budget before a send fails"),
    "DISPATCH_RETRY_MAX_AGE": ("172800", "seconds after the first attempt when retrying stops"),
    "DISPATCH_RESEND_UNKNOWN": ("false", "resend when no reply came after the final dot (risks duplicates)"),
    "DISPATCH_MAX_MESSAGE_BYTES": (str(DEFAULT_MAX_BYTES), "largest MIME message accepted at enqueue"),
    "DISPATCH_MAX_RECIPIENTS": (
        str(MAX_RECIPIENTS),
        "most addresses in to, cc and bcc of one mail at enqueue",
    ),
    "DISPATCH_LEASE_SECONDS": ("30", "in-flight lease; a dead worker's send is requeued after it expires"),
    "DISPATCH_MAINTENANCE_INTERVAL": (
        "10",
        "seconds between a worker's maintenance rounds (recovery of dead workers' sends, reconcile, journal)",
    ),
    "DISPATCH_RECONCILE_AFTER": ("60", "seconds a waiting send may lack an rq job before it gets a new one"),
    "DISPATCH_JOB_TIMEOUT_MARGIN": ("60", "seconds added to the routes' summed deadlines: rq's job timeout"),
    "DISPATCH_JOURNAL_DIR": (
        "$XDG_STATE_HOME/dispatcher/journal (~/.local/state/…)",
        "where a worker keeps outcomes Redis could not take in half a lease; replayed when it returns",
    ),
    "DISPATCH_LOG_LEVEL": ("INFO", "log level of dispatcher's events"),
    "DISPATCH_LOG_FORMAT": ("json off a TTY", "json or console"),
    "DISPATCH_RQ_LOG_LEVEL": ("WARNING", "log level of rq's own per-job messages"),
    "DISPATCH_DASHBOARD_USER": ("(required)", "dashboard login user"),
    "DISPATCH_DASHBOARD_PASSWORD": ("(required)", "dashboard login password"),
    "DISPATCH_DASHBOARD_SECRET": (
        "random per process",
        "Flask's secret key; logins do not depend on it (sessions live in Redis and survive restarts)",
    ),
    "DISPATCH_DASHBOARD_SECURE_COOKIE": ("false", "mark the session cookie Secure (behind HTTPS)"),
    "DISPATCH_DASHBOARD_OPEN": ("false", "run the dashboard without login (loopback only)"),
    "DISPATCH_DASHBOARD_HOSTS": (
        "localhost, 127.0.0.1, [::1]",
        "Host names the dashboard answers to (name: any port; name:port), comma-separated; others get 421",
    ),
    "DISPATCH_API_TOKEN": ("(API off)", "bearer token for the HTTP API"),
    "DISPATCH_API_MAX_BYTES": ("31457280", "largest HTTP API request body"),
    "DISPATCH_TEMPLATES_DIR": ("(templates off)", "directory of the named mail templates producers render"),
}


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
    policies: Mapping[str, RoutePolicy] = field(default_factory=dict)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_message_bytes: int = DEFAULT_MAX_BYTES
    max_recipients: int = MAX_RECIPIENTS
    lease_seconds: float = 30.0
    maintenance_interval: int = 10
    reconcile_after: float = 60.0
    job_timeout_margin: float = 60.0
    journal_dir: str = ""

    def route(self, name: str) -> SmtpConfig:
        try:
            return self.routes[name]
        except KeyError:
            known = ", ".join(sorted(self.routes)) or "none"
            raise UnknownRoute(f"route {name!r} is not configured on this worker (known: {known})") from None

    def job_timeout(self) -> float:
        """Every job's wall-time bound: the slowest route's stage deadlines summed, plus a margin."""
        longest = max((config.timeouts.longest_send() for config in self.routes.values()), default=0.0)
        return longest + self.job_timeout_margin


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "")
    return default if not raw.strip() else parse_number(name, raw, minimum=minimum)


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "")
    return default if not raw.strip() else parse_flag(name, raw)


def route_urls(env: Mapping[str, str]) -> Iterator[tuple[str, str, str]]:
    """(variable, route name, URL) for ``SMTP_URL`` (route ``default``) and every ``SMTP_URL_<NAME>``."""
    for name, value in env.items():
        if name == "SMTP_URL":
            yield name, "default", value
        elif name.startswith(ROUTE_PREFIX) and len(name) > len(ROUTE_PREFIX):
            yield name, name[len(ROUTE_PREFIX) :].lower(), value


def read_routes(env: Mapping[str, str]) -> dict[str, SmtpConfig]:
    routes: dict[str, SmtpConfig] = {}
    for name, route, value in route_urls(env):
        try:
            routes[route] = parse_smtp_url(split_route_url(value)[0])
        except ConfigurationError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None
    return routes


def read_policies(env: Mapping[str, str]) -> dict[str, RoutePolicy]:
    """Each route's limits and fallbacks, from the route options of its URL (``dispatcher.routes.config``)."""
    policies: dict[str, RoutePolicy] = {}
    for name, route, value in route_urls(env):
        try:
            policies[route] = parse_policy(route, split_route_url(value)[1])
        except ConfigurationError as exc:
            raise ConfigurationError(f"{name}: {exc}") from None
    check_fallbacks(policies)
    return policies


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
        redis_url=parse_redis_url("REDIS_URL", env.get("REDIS_URL") or DEFAULT_REDIS_URL),
        routes=routes,
        policies=read_policies(env),
        retry=retry,
        max_message_bytes=int(_number(env, "DISPATCH_MAX_MESSAGE_BYTES", DEFAULT_MAX_BYTES, minimum=1024)),
        max_recipients=int(_number(env, "DISPATCH_MAX_RECIPIENTS", MAX_RECIPIENTS, minimum=1)),
        lease_seconds=_number(env, "DISPATCH_LEASE_SECONDS", 30.0, minimum=2.0),
        maintenance_interval=int(_number(env, "DISPATCH_MAINTENANCE_INTERVAL", 10, minimum=1)),
        reconcile_after=_number(env, "DISPATCH_RECONCILE_AFTER", 60.0, minimum=1.0),
        job_timeout_margin=_number(env, "DISPATCH_JOB_TIMEOUT_MARGIN", 60.0, minimum=1.0),
        journal_dir=env.get("DISPATCH_JOURNAL_DIR") or default_journal_dir(env),
    )


def default_journal_dir(env: Mapping[str, str]) -> str:
    """``$XDG_STATE_HOME/dispatcher/journal``, or under ``~/.local/state`` (state that must survive a
    reboot: not /tmp)."""
    state = env.get("XDG_STATE_HOME") or os.environ.get("XDG_STATE_HOME")
    state = state or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "dispatcher", "journal")
