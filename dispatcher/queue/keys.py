"""Every Redis key dispatcher writes, and how long each lives: nothing else builds a ``dispatch:`` key.

The send store's keys (``queue.store.SendStore`` is the only code that reads or writes them):

    dispatch:send:<id>          hash   mail summary (JSON), priority, state, attempts, generation, timestamps,
                                       record, and the mail itself: ``source`` (the whole mail as JSON,
                                       which the worker builds the MIME message from) or ``raw`` (MIME
                                       given as is); no TTL — ``SendStore.sweep_final`` deletes it
                                       ``RECORD_TTL`` after its last update once final
    dispatch:key:<sha256(key)>  string the send id owning an idempotency key, with the mail's fingerprint
                                       (``KEY_TTL``)
    dispatch:ledger:<msgid>     set    recipients that accepted the message: never sent to again
                                       (``LEDGER_TTL`` after its last write)
    dispatch:state:<state>:<p>  zset   send ids by last update, per state and priority (``<p>`` one of
                                       ``PRIORITIES``, or ``unsorted`` for a record whose priority is not
                                       one of them; a quarantined record whose mail cannot be read counts
                                       as ``default``) — for every state but ``sending``: those are the
                                       records leased in ``dispatch:inflight``
    dispatch:inflight           zset   send ids under a worker's lease, scored by its expiry (recovery; and
                                       the index of ``sending``)

Each attempt writes a send's index entry twice (into ``dispatch:inflight`` and out of its waiting state
at the start, out of it and into its outcome's state at the end); nothing else is kept per state, so the
counts the dashboard shows are ZCARDs and its chart of deliveries per minute is ZCOUNTs over
``delivered``'s indexes (issue 15: every command of an attempt counts).

Keys earlier versions wrote and this one only reads or removes: ``dispatch:source:<id>`` (the mail, before
it moved into the record: still read for sends enqueued before the upgrade), ``dispatch:state:<state>``
and ``dispatch:state:sending:<p>`` (the overall indexes and the ``sending`` ones: no longer written or
read; README "Upgrading") and ``dispatch:delivered:<minute>`` (per-minute counters, expired within 3 h).

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
INFLIGHT = f"{PREFIX}:inflight"
RECONCILER_LOCK = f"{PREFIX}:reconciler"
ROUTES = f"{PREFIX}:routes"


def send_key(send_id: str) -> str:
    return f"{PREFIX}:send:{send_id}"


UNSORTED = "unsorted"
"""The index bucket of a record whose priority cannot be read (not one of ``PRIORITIES``)."""


def state_key(state: str, bucket: str) -> str:
    """The index of sends in ``state`` of one priority (``bucket``: a priority, or ``UNSORTED``)."""
    return f"{PREFIX}:state:{state}:{bucket}"


def ledger_key(message_id: str) -> str:
    return f"{PREFIX}:ledger:{message_id}"


def idempotency_key(key: str) -> str:
    return f"{PREFIX}:key:{hashlib.sha256(key.encode()).hexdigest()}"


def legacy_source_key(send_id: str) -> str:
    """Where a send enqueued before the mail moved into its record keeps the mail (read, never written)."""
    return f"{PREFIX}:source:{send_id}"


def worker_key(name: str) -> str:
    return f"{PREFIX}:worker:{name}"


def login_failures_key(address: str) -> str:
    """Failed dashboard logins from ``address`` (``dashboard.auth``'s lockout counter)."""
    return f"{PREFIX}:login-failures:{address}"


SESSION_PREFIX = f"{PREFIX}:session:"


def session_key(session_hash: str) -> str:
    """A dashboard session, by the sha256 of its id (``dashboard.sessions``)."""
    return f"{SESSION_PREFIX}{session_hash}"
