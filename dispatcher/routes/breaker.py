"""Per-route circuit breaker in Redis, shared by every worker, and the choice of route for one send.

    dispatch:route:<name>:breaker   hash   failures, opened_at (ms, Redis time)     absent = closed
    dispatch:route:<name>:probe     string the one send allowed to try a half-open route (expires)

closed ──(``breaker_failures`` connection-level failures in a row)──► open ──(``breaker_cooldown``)──►
half-open: one send (the holder of ``probe``) tries the route; success closes it, failure opens it again.

Only connection-level failures count: the route could not be reached or would not talk — TCP refused or
unreachable, TLS failure, a 421 (or any refusal) at the greeting, a dropped or timed-out connection before
the greeting. They all happen before MAIL FROM, so failing over can never send a message twice; a reply to
MAIL/RCPT/DATA, a 5xx, or anything after the data went out never moves a send to another route.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import redis
import structlog

from dispatcher.errors import ConnectError, SmtpError, ThrottleTimeout, TlsError
from dispatcher.routes.clock import LUA_NOW_MS, redis_now_ms
from dispatcher.routes.config import RoutePolicy, route_key
from dispatcher.smtp.stages import SETUP_STAGES

logger = structlog.get_logger("dispatcher.routes.breaker")


_NOW = LUA_NOW_MS

# KEYS: breaker, probe. ARGV: cool-down ms, probe ttl ms, token.
# Returns 'closed', 'open', or 'probe' (this caller may try the half-open route).
_ALLOW = (
    _NOW
    + """
local opened_at = tonumber(redis.call('HGET', KEYS[1], 'opened_at'))
if not opened_at then return 'closed' end
if now - opened_at < tonumber(ARGV[1]) then return 'open' end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', tonumber(ARGV[2])) then return 'probe' end
if redis.call('GET', KEYS[2]) == ARGV[3] then return 'probe' end
return 'open'
"""
)

# KEYS: breaker, probe. ARGV: threshold. Returns {failures, 1 if this failure opened (or re-opened) it}.
_FAILURE = (
    _NOW
    + """
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('EXPIRE', KEYS[1], 86400)
local probing = redis.call('DEL', KEYS[2]) == 1
if failures >= tonumber(ARGV[1]) and (probing or not redis.call('HGET', KEYS[1], 'opened_at')) then
  redis.call('HSET', KEYS[1], 'opened_at', now)
  return {failures, 1}
end
return {failures, 0}
"""
)


def breaker_key(route: str) -> str:
    return route_key(route, "breaker")


def probe_key(route: str) -> str:
    return route_key(route, "probe")


def is_connection_failure(exc: BaseException) -> bool:
    """Did ``exc`` happen because the route could not be reached or refused to talk? (Then the message was
    never offered: MAIL FROM comes after all of these.)"""
    if not isinstance(exc, SmtpError) or isinstance(exc, ThrottleTimeout):
        return False  # waiting for our own connection cap is not the route failing
    if isinstance(exc, ConnectError | TlsError):
        return True
    # Refused, dropped or timed out during the set-up (greeting, EHLO, STARTTLS, AUTH): not usable now.
    return exc.stage in SETUP_STAGES


class Breaker:
    """Breakers of every route, read and written in Redis; ``token`` names this process's probes."""

    def __init__(self, connection: redis.Redis, policies: Mapping[str, RoutePolicy], token: str) -> None:
        self.redis = connection
        self.policies = policies
        self.token = token
        self._allow = connection.register_script(_ALLOW)
        self._failure = connection.register_script(_FAILURE)

    def state(self, route: str) -> str:
        """closed | open | half-open (cool-down over, waiting for a probe); reads only."""
        opened_at = self.redis.hget(breaker_key(route), "opened_at")
        if opened_at is None:
            return "closed"
        elapsed = redis_now_ms(self.redis) - float(opened_at)
        return "open" if elapsed < self.policies[route].breaker_cooldown * 1000 else "half-open"

    def allow(self, route: str) -> str:
        """closed | probe | open — whether a send may use ``route`` now."""
        policy = self.policies[route]
        cooldown = policy.breaker_cooldown * 1000
        probe_ttl = max(cooldown, 30_000)  # a probe that died frees the route after this
        keys = [breaker_key(route), probe_key(route)]
        answer = self._allow(keys=keys, args=[cooldown, probe_ttl, self.token])
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def candidates(self, route: str) -> Iterator[str]:
        """The routes a send for ``route`` may try now, in order: the route itself unless its breaker is
        open, then its fallbacks (each under its own breaker). When every one is open, the route itself —
        the send then fails and is retried like any other transient failure."""
        policy = self.policies.get(route)
        if policy is None or not policy.fallbacks:
            yield route  # nowhere to fail over to: no breaker to consult (and no Redis round trip)
            return
        chain = [route, *policy.fallbacks]
        offered = False
        for name in chain:
            if name not in self.policies or self.allow(name) != "open":
                offered = True
                yield name
        if not offered:
            yield route

    def success(self, route: str) -> None:
        """The route answered (greeting and beyond): close its breaker."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hget(breaker_key(route), "opened_at")
        pipe.delete(breaker_key(route), probe_key(route))
        opened_at, _ = pipe.execute()
        if opened_at is not None:
            logger.info("route_breaker_closed", route=route)

    def failure(self, route: str, exc: SmtpError) -> bool:
        """Count a connection-level failure; True when it opened the breaker now."""
        policy = self.policies.get(route)
        if policy is None:
            return False
        failures, opened = self._failure(
            keys=[breaker_key(route), probe_key(route)], args=[policy.breaker_failures]
        )
        if opened:
            logger.warning(
                "route_breaker_opened", route=route, failures=int(failures), error=str(exc),
                cooldown_s=policy.breaker_cooldown, fallbacks=list(policy.fallbacks),
            )  # fmt: skip
        return bool(opened)

    def is_open(self, route: str) -> bool:
        return self.redis.hexists(breaker_key(route), "opened_at")
