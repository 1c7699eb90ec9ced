"""The connection cap of a route (``max_connections``) across every worker: a Redis semaphore of leases.

    dispatch:route:<name>:conns     zset  lease token -> expiry (Redis time, ms)    the slots in use
    dispatch:route:<name>:waiting   zset  process token -> expiry                   who waits for a slot
    dispatch:route:<name>:freed     list  one item per released slot                wakes one waiter (BLPOP)

A slot is held for as long as its connection is open (a kept connection keeps it between jobs). Leases
expire unless refreshed — the process's keeper thread refreshes them — so the slot of a killed worker frees
itself after ``lease_seconds``. A waiter blocks on ``freed`` (BLPOP, bounded by a short timeout so an
expired lease is noticed too), never polls in a tight loop.

Kept connections would starve processes that have none, so a holder yields its slot (QUIT, release) when
someone waits: after a send once it held the slot for ``FAIR_SHARE`` seconds, or at once when idle
between jobs (the keeper thread does it, taking the slot's lock so it never closes a connection in use).
A client holds its slot through ``RouteSlot``, the ``ConnectionPermit`` it is built with.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import weakref
from typing import ClassVar

import redis
import structlog

from dispatcher.errors import ThrottleTimeout
from dispatcher.routes.clock import LUA_NOW_MS, redis_now_ms
from dispatcher.routes.config import RoutePolicy, route_key
from dispatcher.smtp.config import SmtpConfig
from dispatcher.smtp.session import SessionState, SmtpClient
from dispatcher.smtp.stages import Stage

logger = structlog.get_logger("dispatcher.routes.slots")

LEASE_SECONDS = 15.0
FAIR_SHARE = 1.0
WAKE_TIMEOUT = 1.0

# KEYS: conns. ARGV: token, limit, lease ms. Returns 1 when the token holds a slot (new or refreshed).
_ACQUIRE = LUA_NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]) * 2)
  return 1
end
return 0
"""

# KEYS: conns, freed. ARGV: token, limit. Releases the slot and wakes one waiter.
_RELEASE = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('LPUSH', KEYS[2], '1')
  redis.call('LTRIM', KEYS[2], 0, tonumber(ARGV[2]) - 1)
  redis.call('EXPIRE', KEYS[2], 60)
end
return 1
"""

# KEYS: waiting. ARGV: now-relative count of live waiters other than ARGV[1].
_WAITERS = LUA_NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


def conns_key(route: str) -> str:
    return route_key(route, "conns")


def waiting_key(route: str) -> str:
    return route_key(route, "waiting")


def freed_key(route: str) -> str:
    return route_key(route, "freed")


class ConnectionSlots:
    """The semaphore of one route. ``token`` identifies one connection's lease."""

    def __init__(self, connection: redis.Redis, policy: RoutePolicy, *, lease_seconds: float = LEASE_SECONDS):
        assert policy.max_connections is not None
        self.redis, self.policy, self.lease_seconds = connection, policy, lease_seconds
        self.limit = policy.max_connections
        self._acquire = connection.register_script(_ACQUIRE)
        self._release = connection.register_script(_RELEASE)
        self._waiters = connection.register_script(_WAITERS)

    def try_acquire(self, token: str) -> bool:
        """Take (or refresh) a slot for ``token`` if one is free; never waits."""
        keys = [conns_key(self.policy.name)]
        return bool(self._acquire(keys=keys, args=[token, self.limit, int(self.lease_seconds * 1000)]))

    def acquire(self, token: str, max_wait: float) -> bool:
        """Wait up to ``max_wait`` seconds for a slot, blocked on the ``freed`` list between tries."""
        deadline = time.monotonic() + max_wait
        name = self.policy.name
        while True:
            if self.try_acquire(token):
                self.redis.zrem(waiting_key(name), token)
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                self.redis.zrem(waiting_key(name), token)
                return False
            block = min(left, WAKE_TIMEOUT)
            expiry = redis_now_ms(self.redis) + int((block + 2) * 1000)
            self.redis.zadd(waiting_key(name), {token: expiry})
            self.redis.expire(waiting_key(name), 60)
            self.redis.blpop([freed_key(name)], timeout=max(block, 0.01))

    def release(self, token: str) -> None:
        keys = [conns_key(self.policy.name), freed_key(self.policy.name)]
        self._release(keys=keys, args=[token, self.limit])

    def waiters(self) -> int:
        return int(self._waiters(keys=[waiting_key(self.policy.name)]))

    def in_use(self) -> int:
        return int(self.redis.zcard(conns_key(self.policy.name)))


class RouteSlot:
    """One client's hold on a slot of its route's semaphore: the ``ConnectionPermit`` an ``SmtpClient`` of
    a capped route is built with (``capped_client``).

    The client ``acquire``s it before the TCP connect and ``release``s it when the connection ends; the
    route gate ``take``s it (bounded wait) before a send, holds ``in_use`` while the job uses the client,
    and ``share``s it after a send. The process's keeper thread refreshes every held lease and gives an
    idle connection's slot to a waiter.
    """

    _live: ClassVar[weakref.WeakSet[RouteSlot]] = weakref.WeakSet()
    _keeper: ClassVar[threading.Thread | None] = None

    def __init__(self, slots: ConnectionSlots) -> None:
        self.slots = slots
        self.lock = threading.RLock()
        self.token = ""
        self.slot_since = 0.0
        self._client: weakref.ref[SmtpClient] | None = None
        RouteSlot._live.add(self)
        RouteSlot._start_keeper()

    def attach(self, client: SmtpClient) -> None:
        self._client = weakref.ref(client)

    @property
    def client(self) -> SmtpClient | None:
        return self._client() if self._client is not None else None

    def take(self, max_wait: float) -> bool:
        """Hold a slot (waiting up to ``max_wait``); True if held."""
        if self.token:
            return True
        client = self.client
        token = f"{(client.conn_id if client else '') or 'conn'}-{uuid.uuid4().hex[:12]}"
        if not self.slots.acquire(token, max_wait):
            return False
        self.token, self.slot_since = token, time.monotonic()
        return True

    def acquire(self) -> None:
        if not self.take(self.slots.policy.max_wait):
            raise ThrottleTimeout(
                f"no free connection slot on route {self.slots.policy.name!r} "
                f"(max_connections={self.slots.limit}) within {self.slots.policy.max_wait:g}s",
                stage=Stage.CONNECT,
            )

    def release(self) -> None:
        if not self.token:
            return
        token, self.token = self.token, ""
        try:
            self.slots.release(token)
        except redis.RedisError as exc:  # the lease expires by itself
            logger.warning("route_slot_release_failed", route=self.slots.policy.name, error=str(exc))

    def share(self) -> None:
        with self.lock:
            self._yield_if_wanted()

    def in_use(self) -> contextlib.AbstractContextManager[object]:
        return self.lock

    def _conn_id(self) -> str:
        client = self.client
        return client.conn_id if client is not None else ""

    def _yield_if_wanted(self) -> bool:
        """Close (QUIT) and release the slot when another connection waits and we had our share."""
        if not self.token or time.monotonic() - self.slot_since < FAIR_SHARE:
            return False
        if self.slots.waiters() == 0:
            return False
        client = self.client
        logger.info("route_slot_yielded", route=self.slots.policy.name, conn_id=self._conn_id())
        if client is not None:
            client.close()  # releases through the client's permit
        self.release()
        return True

    @classmethod
    def _start_keeper(cls) -> None:
        if cls._keeper is None:
            cls._keeper = threading.Thread(target=cls._keep, name="slots", daemon=True)
            cls._keeper.start()

    @classmethod
    def _keep(cls) -> None:
        """Refresh held leases; give an idle connection's slot to a waiter."""
        last_refresh = 0.0
        while True:
            time.sleep(0.2)  # the keeper's period, not a wait for a condition
            refresh = time.monotonic() - last_refresh >= LEASE_SECONDS / 3
            if refresh:
                last_refresh = time.monotonic()
            for slot in list(cls._live):
                try:
                    slot._tend(refresh)
                except redis.RedisError as exc:
                    logger.warning("route_slot_refresh_failed", route=slot.slots.policy.name, error=str(exc))

    def _tend(self, refresh: bool) -> None:
        if not self.token:
            return
        client = self.client
        if refresh and not self.slots.try_acquire(self.token):
            # Our lease lapsed (the process stalled) and the slot went to another connection.
            logger.warning("route_slot_lease_lost", route=self.slots.policy.name, conn_id=self._conn_id())
        if client is None or client.state is not SessionState.READY or not self.lock.acquire(blocking=False):
            return
        try:
            if self.token and client.state is SessionState.READY:
                self._yield_if_wanted()
        finally:
            self.lock.release()


def capped_client(config: SmtpConfig, slots: ConnectionSlots) -> SmtpClient:
    """A client of a route capped by ``max_connections``: it holds a slot while its connection is open."""
    slot = RouteSlot(slots)
    client = SmtpClient(config, permit=slot)
    slot.attach(client)
    return client
