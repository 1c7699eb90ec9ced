"""Redis's clock: the one time every worker on every host agrees on.

The shared limits (``throttle``), connection slots (``slots``) and breakers (``breaker``) compare times
written by different hosts, so they never read a host's own clock: Lua scripts start with ``LUA_NOW_MS``
(``now``, milliseconds from Redis ``TIME``) and Python code asks ``redis_now_ms``.
"""

from __future__ import annotations

import redis

LUA_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""


def redis_now_ms(connection: redis.Redis) -> int:
    seconds, micros = connection.time()
    return int(seconds) * 1000 + int(micros) // 1000
