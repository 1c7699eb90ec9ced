"""Every Redis key dispatcher writes, and how long each lives: nothing else builds a ``dispatch:`` key.

The send store's keys (``queue.store.SendStore`` is the only code that reads or writes them):

    dispatch:send:<id>          hash   mail summary (JSON), state, attempts, generation, timestamps, record
    dispatch:source:<id>        string the whole mail (JSON) the worker builds the MIME message from
    dispatch:key:<sha256(key)>  string the send id owning an idempotency key, with the mail's fingerprint
    dispatch:ledger:<msgid>     set    recipients that accepted the message: never sent to again
    dispatch:state:<state>      zset   send ids by last update, one per state (dashboard, retry filters)
    dispatch:state:<state>:<p>  zset   the same per priority (the dashboard's per-queue counts)
    dispatch:inflight           zset   send ids being sent, scored by lease expiry (crash recovery)
    dispatch:delivered:<minute> string messages delivered in that minute (overview chart)

The workers' presence (``queue.presence.Presence``):

    dispatch:worker:<name>      string JSON: a live worker's routes and SMTP connection states
    dispatch:routes             zset   route names the live workers have -> when that sighting expires
    dispatch:reconciler         string the lock of the worker reconciling sends this round (30 s)

Other owners build their keys from ``PREFIX`` here: a route's limits, slots and breaker
(``routes.config.route_key``, one module per kind: ``routes.throttle``, ``routes.slots``,
``routes.breaker``), the dashboard's login lockout (``dashboard.auth``) and its sessions
(``dashboard.sessions``: ``dispatch:session:<sha256(id)>``, a string of JSON, 8 h; logged-in sessions
only). rq's own keys are rq's.
"""

from __future__ import annotations

import hashlib

PREFIX = "dispatch"
LEDGER_TTL = 30 * 86400
KEY_TTL = 30 * 86400
RECORD_TTL = 30 * 86400
STATS_TTL = 3 * 3600
INFLIGHT = f"{PREFIX}:inflight"
RECONCILER_LOCK = f"{PREFIX}:reconciler"
ROUTES = f"{PREFIX}:routes"


def send_key(send_id: str) -> str:
    return f"{PREFIX}:send:{send_id}"


def state_key(state: str, priority: str | None = None) -> str:
    """The index of sends in ``state``; with ``priority``, only those of that queue."""
    return f"{PREFIX}:state:{state}" if priority is None else f"{PREFIX}:state:{state}:{priority}"


def ledger_key(message_id: str) -> str:
    return f"{PREFIX}:ledger:{message_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}:key:{hashlib.sha256(key.encode()).hexdigest()}"


def source_key(send_id: str) -> str:
    return f"{PREFIX}:source:{send_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def delivered_key(minute: int) -> str:
    return f"{PREFIX}:delivered:{minute}"


def login_failures_key(address: str) -> str:
    """Failed dashboard logins from ``address`` (``dashboard.auth``'s lockout counter)."""
    return f"{PREFIX}:login-failures:{address}"


SESSION_PREFIX = f"{PREFIX}:session:"


def session_key(session_hash: str) -> str:
    """A dashboard session, by the sha256 of its id (``dashboard.sessions``)."""
    return f"{SESSION_PREFIX}{session_hash}"
