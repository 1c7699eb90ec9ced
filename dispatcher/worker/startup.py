"""A worker started while Redis is away waits for it instead of dying with a traceback.

Why wait rather than exit: a worker host often boots before (or restarts while) its Redis does, and the
supervisor — ours, systemd, docker — would only start it again; a worker that waits starts delivering the
moment Redis answers, with one ``worker_waiting_for_redis`` line per attempt (the error, the attempt, the
delay to the next one) instead of a restart storm. The delay doubles from ``BASE`` to ``CAP``. A stop
signal during the wait ends it (the worker then exits 0 without having started). A wrong URL is no reason
to wait: it is refused before this (``values.parse_redis_url``, exit 2).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
import structlog

from dispatcher.queue.store import OUTAGE

logger = structlog.get_logger("dispatcher.worker.startup")
BASE = 0.5
CAP = 10.0
_NAP = 0.1  # how often a wait looks at the stop flag


def where(connection: redis.Redis) -> str:
    """``host:port/db`` (or the socket path) of ``connection``: never its password."""
    kwargs = connection.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix:{kwargs['path']}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def wait_for_redis(connection: redis.Redis, stop: Callable[[], bool]) -> bool:
    """PING until Redis answers (True) or ``stop()`` turns true (False)."""
    delay = BASE
    attempt = 0
    while not stop():
        attempt += 1
        try:
            connection.ping()
        except OUTAGE as exc:
            logger.warning(
                "worker_waiting_for_redis",
                redis=where(connection),
                attempt=attempt,
                error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                retry_in=delay,
            )
        else:
            if attempt > 1:
                logger.info("worker_redis_reachable", redis=where(connection), attempts=attempt)
            return True
        deadline = time.monotonic() + delay
        while not stop() and time.monotonic() < deadline:
            time.sleep(min(_NAP, max(0.0, deadline - time.monotonic())))
        delay = min(CAP, delay * 2)
    return False
