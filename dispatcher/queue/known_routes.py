"""The route names the live workers are configured with, published in Redis for the producers.

Routes live on the workers (``SMTP_URL_<NAME>``), so a producer cannot tell a mistyped ``route`` from a
real one by itself. Every worker process adds its route names to one sorted set at each maintenance round
(and at start), scored by when that sighting expires (``ttl`` after it); the set itself expires too. A
producer reads the names whose sighting has not expired: when there are some, a ``route`` outside them is
a field error; when there are none (no worker has started yet), it cannot tell and accepts — the worker
then fails such a send permanently (``errors.UnknownRoute``).

    dispatch:routes   zset   route name -> Unix time its last sighting expires
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from dispatcher.queue.keys import PREFIX

KEY = f"{PREFIX}:routes"


def publish(connection: redis.Redis, names: Iterable[str], ttl: float, now: float | None = None) -> None:
    """Say that a live worker has the routes ``names``, for the next ``ttl`` seconds."""
    now = time.time() if now is None else now
    expires = now + ttl
    with connection.pipeline(transaction=True) as pipe:
        pipe.zadd(KEY, dict.fromkeys(names, expires))
        pipe.zremrangebyscore(KEY, "-inf", now)
        pipe.expire(KEY, max(1, int(ttl) + 1))
        pipe.execute()


def known(connection: redis.Redis, now: float | None = None) -> frozenset[str]:
    """The route names some live worker published (empty: none has, or none is running)."""
    now = time.time() if now is None else now
    return frozenset(name.decode() if isinstance(name, bytes) else str(name)
                     for name in connection.zrangebyscore(KEY, now, "+inf"))  # fmt: skip
