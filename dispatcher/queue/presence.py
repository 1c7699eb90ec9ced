"""Who is alive and working, for the others to see: each worker's published status (routes and SMTP
connections, for the dashboard), the route names live workers have (producers refuse any other), and the
lock that lets one worker at a time reconcile sends. Owns ``dispatch:worker:<name>``, ``dispatch:routes``
and ``dispatch:reconciler`` (``queue.keys``); a send's own keys are ``queue.store``'s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import redis

from dispatcher.queue.keys import RECONCILER_LOCK, ROUTES, worker_key
from dispatcher.queue.records import text
from dispatcher.queue.store import outage_is_unavailable


class Presence:
    """Worker statuses, live route names and the reconciler's lock; Redis outages are
    ``QueueUnavailable``."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    @outage_is_unavailable
    def publish_worker(self, name: str, status: Mapping[str, Any], ttl: int) -> None:
        """What worker ``name`` says of its routes and connections, until it stops refreshing it."""
        self.redis.set(worker_key(name), json.dumps(status), ex=ttl)

    @outage_is_unavailable
    def worker_statuses(self, names: Sequence[str]) -> list[dict[str, Any] | None]:
        """The published status of each of ``names`` (None where there is none)."""
        values = self.redis.mget([worker_key(n) for n in names]) if names else []
        return [json.loads(v) if v else None for v in values]

    @outage_is_unavailable
    def forget_worker(self, name: str) -> None:
        self.redis.delete(worker_key(name))

    @outage_is_unavailable
    def publish_routes(self, names: Iterable[str], ttl: float, now: float | None = None) -> None:
        """A live worker has the routes ``names``, for the next ``ttl`` seconds: producers refuse a
        ``route`` outside every live worker's names (``known_routes``). Each sighting expires on its own
        (its score), the set when no worker refreshes it."""
        now = time.time() if now is None else now
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zadd(ROUTES, dict.fromkeys(names, now + ttl))
            pipe.zremrangebyscore(ROUTES, "-inf", now)
            pipe.expire(ROUTES, max(1, int(ttl) + 1))
            pipe.execute()

    @outage_is_unavailable
    def known_routes(self, now: float | None = None) -> frozenset[str]:
        """The route names some live worker published (empty: none has yet, or none is running)."""
        now = time.time() if now is None else now
        return frozenset(text(name) for name in self.redis.zrangebyscore(ROUTES, now, "+inf"))

    # -- the reconciler's lock ------------------------------------------------------------------------

    @outage_is_unavailable
    def take_reconciler_lock(self, token: str, seconds: int) -> bool:
        """Whether this caller (``token``) holds the reconciler's lock now, for ``seconds`` at most."""
        return bool(self.redis.set(RECONCILER_LOCK, token, nx=True, ex=seconds))

    @outage_is_unavailable
    def drop_reconciler_lock(self, token: str) -> None:
        """Let the lock go, if ``token`` still holds it."""
        if text(self.redis.get(RECONCILER_LOCK) or b"") == token:
            self.redis.delete(RECONCILER_LOCK)
