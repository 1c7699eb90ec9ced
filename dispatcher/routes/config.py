"""Route policies: provider limits and fallbacks, read from the route URL's query next to the SMTP options.

    SMTP_URL=smtp+starttls://user:pass@relay.example.com:587?rate=14&daily=50000&max_connections=2&fallback=backup
    SMTP_URL_BACKUP=smtps://user:pass@backup.example.net

The options below belong to the route, not to the SMTP connection: ``split_route_url`` strips them before
the rest of the URL goes to ``dispatcher.smtp.config.parse_smtp_url`` (which refuses unknown options, so a
typo still fails loudly at start-up).

``rate``               messages per second, shared by every worker on every host (Redis token bucket)
``burst``              tokens the bucket holds (default 1: sends are spaced evenly, never bunched)
``daily``              messages per UTC day (per ``daily_period``)
``daily_period``       the cap's window in seconds (default 86400: the UTC day); windows start at whole
                       multiples of it since the epoch, so every host agrees when one ends
``max_connections``    concurrent SMTP connections to the route across all workers
``max_wait``           seconds a send may wait in its job for a token or a connection slot (default 30);
                       a longer wait defers the send without spending one of its attempts
``slowdown_step``      after a 421 or 4.7.x the rate is halved; every ``slowdown_step`` seconds (default 30)
                       a quarter of the configured rate comes back
``fallback``           routes to use, in order, while this route's breaker is open (comma-separated)
``breaker_failures``   consecutive connection-level failures that open the breaker (default 3)
``breaker_cooldown``   seconds the breaker stays open before one probe send may try the route (default 30)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from dispatcher.errors import ConfigurationError
from dispatcher.queue.keys import PREFIX
from dispatcher.values import parse_number

ROUTE_OPTIONS = frozenset({
    "rate", "burst", "daily", "daily_period", "max_connections", "max_wait", "slowdown_step",
    "fallback", "breaker_failures", "breaker_cooldown",
})  # fmt: skip


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Limits and failover of one route; ``None`` means unlimited. See the module docstring."""

    name: str
    rate: float | None = None
    burst: int = 1
    daily: int | None = None
    daily_period: int = 86400
    max_connections: int | None = None
    max_wait: float = 30.0
    slowdown_step: float = 30.0
    fallbacks: tuple[str, ...] = ()
    breaker_failures: int = 3
    breaker_cooldown: float = 30.0

    @property
    def limited(self) -> bool:
        """True when sends on this route must ask Redis for a token first."""
        return self.rate is not None or self.daily is not None


def route_key(route: str, part: str) -> str:
    """The Redis key of one piece of a route's shared state (bucket, day counter, slots, breaker…)."""
    return f"{PREFIX}:route:{route}:{part}"


def split_route_url(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without the route options, and those options (last one wins)."""
    parts = urlsplit(url)
    kept: list[tuple[str, str]] = []
    route: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name in ROUTE_OPTIONS:
            route[name] = value
        else:
            kept.append((name, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), route


def _positive(name: str, value: str, *, integer: bool = False, maximum: float = 1e9) -> float:
    return parse_number(f"route option {name}", value, integer=integer, above=0, maximum=maximum)


def parse_policy(name: str, options: Mapping[str, str]) -> RoutePolicy:
    """The ``RoutePolicy`` of route ``name`` from the options ``split_route_url`` took out of its URL."""
    fields: dict[str, object] = {}
    for option, value in options.items():
        if option == "fallback":
            fallbacks = tuple(part.strip().lower() for part in value.split(",") if part.strip())
            if name in fallbacks:
                raise ConfigurationError(
                    f"route option fallback={value!r}: a route cannot fall back to itself"
                )
            fields["fallbacks"] = fallbacks
        elif option in ("burst", "daily", "max_connections", "breaker_failures"):
            fields[option] = int(_positive(option, value, integer=True))
        elif option == "daily_period":
            fields[option] = int(_positive(option, value, integer=True, maximum=31 * 86400))
        elif option == "rate":
            fields[option] = _positive(option, value, maximum=1e6)
        else:  # max_wait, slowdown_step, breaker_cooldown: seconds
            fields[option] = _positive(option, value, maximum=86400)
    return RoutePolicy(name, **fields)  # type: ignore[arg-type]


def check_fallbacks(policies: Mapping[str, RoutePolicy]) -> None:
    """Every fallback must name a configured route."""
    for policy in policies.values():
        for fallback in policy.fallbacks:
            if fallback not in policies:
                known = ", ".join(sorted(policies))
                raise ConfigurationError(
                    f"route {policy.name!r}: fallback {fallback!r} is not configured (known: {known}); "
                    f"define it with SMTP_URL_{fallback.upper()}"
                )
