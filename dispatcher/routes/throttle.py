"""Provider limits shared by every worker on every host, held in Redis: rate, daily cap, adaptive slow-down.

Workers on many hosts can only agree through Redis, so every decision is one Lua script (atomic, on
Redis's clock — ``TIME`` — so hosts with skewed clocks still share one bucket):

    dispatch:route:<name>:bucket        hash   tokens, ts (ms), factor, cut_at (ms)   token bucket + slow-down
    dispatch:route:<name>:day:<YYYYMMDD> string messages reserved that UTC day (expires after 2 days)
    dispatch:route:<name>:cap:<p>:<n>    string the same for a ``daily_period`` of p seconds: window n

``reserve`` takes one token *ahead of time*: the bucket may go negative, and the caller sleeps until its
token's time — so waiting workers form a queue instead of polling, and sends are spaced exactly
``1/rate`` apart (with ``burst=1``). A wait longer than ``max_wait`` reserves nothing: the caller defers
the send. A 421 or 4.7.x reply calls ``slow_down``: the factor applied to the rate is halved (at most once
per second: one burst of refusals seen by many workers is one signal) and comes back by a quarter every
``slowdown_step`` seconds — computed lazily by the scripts, so no process has to be alive to recover it.

The connection cap (``max_connections``) is ``slots.ConnectionSlots``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
import structlog

from dispatcher.routes.clock import LUA_NOW_MS, redis_now_ms
from dispatcher.routes.config import RoutePolicy, route_key

logger = structlog.get_logger("dispatcher.routes.throttle")

MIN_FACTOR = 1 / 16
RECOVERY_STEP = 0.25
CUT_GUARD_MS = 1000
DAY = 86400
BATCH_WINDOW = 0.05  # seconds of a fast route's rate taken per Redis call
MAX_BATCH = 16

# Shared by both scripts: the slow-down factor in force at `now` (ms), recovering step by step.
_FACTOR = """
local function current_factor(key, now, step_ms)
  local f = redis.call('HMGET', key, 'factor', 'cut_at')
  local factor, cut_at = tonumber(f[1]), tonumber(f[2])
  if not factor then return 1.0, nil end
  factor = math.min(1.0, factor + RECOVERY_STEP * math.floor((now - cut_at) / step_ms))
  return factor, cut_at
end
""".replace("RECOVERY_STEP", repr(RECOVERY_STEP)) + LUA_NOW_MS

# KEYS: bucket, day counter. ARGV: rate/s, burst, max_wait ms, daily cap (0 = none), day ttl s, step ms,
# count (tokens to take at once; the last one's wait is the one checked and returned).
# Returns {code, wait ms, factor, tokens before, tokens per ms, now ms}: code 1 = reserved (send after
# `wait`), 0 = wait too long, 2 = daily cap.
_RESERVE = (
    _FACTOR
    + """
local rate, burst, max_wait = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local daily, step_ms, count = tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
local factor = current_factor(KEYS[1], now, step_ms)
if factor >= 1.0 then redis.call('HDEL', KEYS[1], 'factor', 'cut_at') end
if daily > 0 and tonumber(redis.call('GET', KEYS[2]) or '0') >= daily then
  return {2, '0', tostring(factor), '0', '0', tostring(now)}
end
local wait, before, per_ms = 0, 0, 0
if rate > 0 then
  per_ms = rate * factor / 1000
  local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
  local tokens, ts = tonumber(b[1]), tonumber(b[2])
  if not tokens then tokens, ts = burst, now end
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * per_ms); ts = now end
  before = tokens
  if tokens < count then wait = (count - tokens) / per_ms end
  if wait > max_wait then return {0, tostring(wait), tostring(factor), '0', '0', tostring(now)} end
  redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - count), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[1], math.ceil(wait + burst / per_ms + step_ms * 8 + 60000))
end
if daily > 0 then
  redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[5]))
end
return {1, tostring(wait), tostring(factor), tostring(before), tostring(per_ms), tostring(now)}
"""
)

# KEYS: bucket. ARGV: step ms, min factor, guard ms. Returns the new factor, or -1 when inside the guard.
_SLOW_DOWN = (
    _FACTOR
    + """
local factor, cut_at = current_factor(KEYS[1], now, tonumber(ARGV[1]))
if cut_at and now - cut_at < tonumber(ARGV[3]) then return '-1' end
factor = math.max(tonumber(ARGV[2]), factor / 2)
redis.call('HSET', KEYS[1], 'factor', tostring(factor), 'cut_at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[1]) * 8 + 60000))
return tostring(factor)
"""
)


def bucket_key(route: str) -> str:
    return route_key(route, "bucket")


def day_key(route: str, when: float | None = None, period: int = DAY) -> str:
    """The counter of the cap window holding ``when``: the UTC day, or window n of ``period`` seconds."""
    moment = time.time() if when is None else when
    if period == DAY:
        return route_key(route, f"day:{datetime.fromtimestamp(moment, UTC).strftime('%Y%m%d')}")
    return route_key(route, f"cap:{period}:{int(moment // period)}")


def window_end(period: int = DAY, now: float | None = None) -> float:
    """When the cap window holding ``now`` ends (the next UTC midnight for the default day)."""
    now = time.time() if now is None else now
    return (now // period + 1) * period


@dataclass(frozen=True, slots=True)
class Reservation:
    """The answer of ``Throttle.reserve``: ``granted`` with ``wait`` seconds to sleep, or refused with
    ``wait`` seconds until trying again is worth it; ``reason`` says which limit decided."""

    granted: bool
    wait: float
    factor: float
    reason: str = "rate"
    due_ms: float | None = None
    """A granted token's time on Redis's clock (``clock``), when a rate limit issued it: the schedule the
    limiter keeps, free of the jitter a send adds on its way to the server."""


class Throttle:
    """Rate and daily cap of the routes, shared through Redis; one per process (keeps what it logged)."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._reserve = connection.register_script(_RESERVE)
        self._slow_down = connection.register_script(_SLOW_DOWN)
        self._factors: dict[str, float] = {}
        self._held: dict[str, deque[tuple[float, float]]] = {}
        """Per route, the tokens taken ahead: (monotonic time usable, due time on Redis's clock in ms)."""

    def batch_size(self, policy: RoutePolicy) -> int:
        """Tokens to take per Redis call: as many as ``BATCH_WINDOW`` seconds of the rate (one for slow
        rates, so their spacing stays exact; one with a daily cap, which counts messages)."""
        if policy.rate is None or policy.daily is not None:
            return 1
        rate = policy.rate * self._factors.get(policy.name, 1.0)
        return max(1, min(MAX_BATCH, int(rate * BATCH_WINDOW)))

    def reserve(self, policy: RoutePolicy, max_wait: float | None = None) -> Reservation:
        """Take the route's next token if it comes within ``max_wait`` (default: the route's) seconds.

        A fast route hands out several tokens per Redis call; this process keeps the rest, each usable at
        its own time, so an unreached limit costs one round trip per ``batch_size`` messages."""
        if not policy.limited:
            return Reservation(True, 0.0, 1.0)
        limit = policy.max_wait if max_wait is None else max_wait
        held = self._held.get(policy.name)
        if held:
            usable, held_due_ms = held[0]
            wait = max(0.0, usable - time.monotonic())
            if wait > limit:
                return Reservation(False, wait, self._factors.get(policy.name, 1.0))
            held.popleft()
            return Reservation(True, wait, self._factors.get(policy.name, 1.0), due_ms=held_due_ms)
        count = self.batch_size(policy)
        code, wait_ms, factor_text, before_text, per_ms_text, now_text = self._reserve(
            keys=[bucket_key(policy.name), day_key(policy.name, period=policy.daily_period)],
            args=[policy.rate or 0, policy.burst, limit * 1000, policy.daily or 0, 2 * policy.daily_period,
                  policy.slowdown_step * 1000, count],
        )  # fmt: skip
        factor = float(factor_text)
        self._note_factor(policy, factor)
        wait = float(wait_ms) / 1000
        if int(code) == 2:
            return Reservation(False, window_end(policy.daily_period) - time.time(), factor, "daily")
        now_ms = float(now_text)
        if int(code) == 1 and count > 1:
            start, before, per_ms = time.monotonic(), float(before_text), float(per_ms_text)
            offsets = [max(0.0, (i - before) / per_ms) for i in range(1, count + 1)]  # ms after `now`
            self._held[policy.name] = deque((start + ms / 1000, now_ms + ms) for ms in offsets[1:])
            wait = offsets[0] / 1000
        due_ms = now_ms + wait * 1000 if int(code) == 1 and policy.rate else None
        return Reservation(int(code) == 1, wait, factor, due_ms=due_ms)

    def acquire(self, policy: RoutePolicy, max_wait: float | None = None) -> Reservation:
        """``reserve``, then sleep until the token's time when it was granted (never a busy loop)."""
        reservation = self.reserve(policy, max_wait)
        if reservation.granted and reservation.wait > 0:
            time.sleep(reservation.wait)
        return reservation

    def slow_down(self, policy: RoutePolicy, *, code: int, enhanced: str | None) -> float | None:
        """A 421 or 4.7.x came back: halve the route's rate for a while. Returns the new factor, or None
        when another worker already cut it for the same burst."""
        result = float(self._slow_down(
            keys=[bucket_key(policy.name)], args=[policy.slowdown_step * 1000, MIN_FACTOR, CUT_GUARD_MS]
        ))  # fmt: skip
        if result < 0:
            return None
        self._factors[policy.name] = result
        self._held.pop(policy.name, None)  # tokens taken at the old rate are not spent after a cut
        logger.warning(
            "route_slowed_down", route=policy.name, code=code, enhanced=enhanced, factor=result,
            rate=_effective(policy, result), recovers_every_s=policy.slowdown_step,
        )  # fmt: skip
        return result

    def factor(self, policy: RoutePolicy) -> float:
        """The slow-down factor in force now (1.0 = full rate); reads only."""
        raw = self.redis.hmget(bucket_key(policy.name), ["factor", "cut_at"])
        if raw[0] is None or raw[1] is None:
            return 1.0
        elapsed = redis_now_ms(self.redis) - float(raw[1])
        steps = elapsed // (policy.slowdown_step * 1000)
        return min(1.0, float(raw[0]) + RECOVERY_STEP * steps)

    def sent_today(self, policy: RoutePolicy) -> int:
        return int(self.redis.get(day_key(policy.name, period=policy.daily_period)) or 0)

    def _note_factor(self, policy: RoutePolicy, factor: float) -> None:
        """Log each recovery step once per process, as this process first sees it."""
        seen = self._factors.get(policy.name, 1.0)
        if factor > seen:
            event = "route_rate_recovered" if factor >= 1.0 else "route_rate_recovering"
            logger.info(event, route=policy.name, factor=factor, rate=_effective(policy, factor))
        if factor != seen:
            self._factors[policy.name] = factor


def _effective(policy: RoutePolicy, factor: float) -> float | None:
    return round(policy.rate * factor, 3) if policy.rate is not None else None


def is_slow_down(code: int | None, enhanced: str | None) -> bool:
    """421 (service closing, often "too many connections / messages") or any 4.7.x (RFC 3463 security
    or policy status — providers' "slow down" / rate-limit replies)."""
    if code is None:
        return False
    return code == 421 or (400 <= code < 500 and enhanced is not None and enhanced.startswith("4.7."))
