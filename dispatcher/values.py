"""The small values settings and filters are made of — flags, numbers, Redis URLs, ``since`` moments —
parsed in one place, with errors that say where the value came from (an environment variable, an option,
a URL option, a request field) and what was expected."""

from __future__ import annotations

import math
import re
import time
from datetime import datetime
from urllib.parse import urlsplit

from redis import ConnectionPool

from dispatcher.errors import ConfigurationError, ValidationError

TRUE = frozenset({"1", "true", "yes", "on"})
FALSE = frozenset({"0", "false", "no", "off"})


def parse_flag(label: str, raw: str) -> bool:
    """``true/false``, ``yes/no``, ``on/off``, ``1/0`` (any case)."""
    lowered = raw.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ConfigurationError(f"{label}={raw!r}: expected true or false")


def parse_number(
    label: str,
    raw: str,
    *,
    integer: bool = False,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
) -> float:
    """A finite number (``integer``: a whole one) within the given bounds."""
    try:
        value = float(int(raw.strip())) if integer else float(raw)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise ConfigurationError(f"{label}={raw!r}: expected {kind}") from None
    if not math.isfinite(value):
        raise ConfigurationError(f"{label}={raw!r}: expected a finite number")
    if minimum is not None and value < minimum:
        raise ConfigurationError(f"{label}={raw!r}: must be at least {minimum:g}")
    if above is not None and value <= above:
        raise ConfigurationError(f"{label}={raw!r}: must be above {above:g}")
    if maximum is not None and value > maximum:
        raise ConfigurationError(f"{label}={raw!r}: must be at most {maximum:g}")
    return value


REDIS_SCHEMES = ("redis", "rediss", "unix")


def parse_redis_url(label: str, raw: str) -> str:
    """A Redis URL redis-py can use (``redis://``, ``rediss://``, ``unix://``; a database path ``/N``).

    The error names ``label`` and never repeats the URL or redis-py's text about it: a password with an
    unescaped ``/``, ``?`` or ``#`` ends up in what redis-py calls the host or port."""
    url = raw.strip()
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in REDIS_SCHEMES:
        shown = f"scheme {scheme.lower()!r}" if sep and scheme.isascii() and scheme.isalnum() else "no scheme"
        raise ConfigurationError(f"{label}: {shown}; expected redis://, rediss:// or unix:// (a Redis URL)")
    try:
        parsed = urlsplit(url)
        ConnectionPool.from_url(url)  # redis-py's own reading of it; connects to nothing
    except ValueError:
        raise ConfigurationError(
            f"{label}: not a usable Redis URL (its host or port cannot be read; percent-encode a password's "
            "special characters: / as %2F, ? as %3F, # as %23, @ as %40)"
        ) from None
    if scheme.lower() != "unix" and parsed.path not in ("", "/") and not parsed.path[1:].isdigit():
        raise ConfigurationError(f"{label}: the database (the URL's path) must be a number, e.g. /0")
    return url


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd])")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
EARLIEST_UNIX_SECONDS = 1_000_000_000  # 2001-09-09: smaller bare numbers are durations typed without a unit
SINCE_FORMS = "Unix seconds (1767225600), a duration ago (90s, 30m, 2h, 7d) or ISO 8601 with a zone"


def parse_since(label: str, value: object, *, now: float | None = None) -> float:
    """A moment for a ``since`` filter, as Unix seconds, from any of its forms (``SINCE_FORMS``): a number
    (JSON) or a string of one is Unix seconds (from 2001 on: a smaller one is refused as a duration typed
    without its unit); a number with a unit is that long before ``now``; else an ISO 8601 time with a zone.
    ``ValidationError`` naming ``label`` for anything else — the API and the CLI read ``since`` through this
    one function."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValidationError({label: f"expected {SINCE_FORMS}"})
    text = value.strip() if isinstance(value, str) else ""
    duration = _DURATION.fullmatch(text)
    if isinstance(value, int | float) or _NUMBER.fullmatch(text):
        number = float(value if isinstance(value, int | float) and abs(value) < 1e12 else text or math.inf)
        if not math.isfinite(number) or number < EARLIEST_UNIX_SECONDS:
            shown = repr(text[:40]) if isinstance(value, str) else f"{number:g}"
            raise ValidationError({label: f"{shown}: Unix seconds from 2001 on (1000000000); "
                                          "for a duration give its unit (90s, 30m, 2h, 7d)"})  # fmt: skip
        return number
    if duration is not None:
        return (time.time() if now is None else now) - float(duration[1]) * _UNIT_SECONDS[duration[2]]
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValidationError({label: f"{text[:40]!r}: expected {SINCE_FORMS}"}) from None
    if parsed.tzinfo is None:
        raise ValidationError({label: f"{text[:40]!r}: give a zone, e.g. 2026-11-27T16:00:00Z"})
    return parsed.timestamp()
