"""The small values settings are made of — flags and numbers — parsed in one place, with errors that say
where the value came from (an environment variable, a URL option) and what was expected."""

from __future__ import annotations

import math

from dispatcher.errors import ConfigurationError

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
