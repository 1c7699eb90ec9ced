"""Where a send lives in Redis: its record, its state indexes, the idempotency keys and the ledger.

rq jobs only carry a send id; the record below is the source of truth for state, attempts and every
recipient's outcome, so retries, the CLI and the dashboard never depend on rq's registries or pickles.

    dispatch:send:<id>          hash   mail summary (JSON), state, attempts, generation, timestamps, record
    dispatch:source:<id>        string the whole mail (JSON) the worker builds the MIME message from
    dispatch:key:<sha256(key)>  string the send id owning an idempotency key
    dispatch:ledger:<msgid>     set    recipients that accepted the message: never sent to again
    dispatch:state:<state>      zset   send ids by last update, one per state (dashboard, retry filters)
    dispatch:state:<state>:<p>  zset   the same per priority (the dashboard's per-queue counts)
    dispatch:inflight           zset   send ids being sent, scored by lease expiry (crash recovery)
    dispatch:delivered:<minute> string messages delivered in that minute (overview chart)
    dispatch:worker:<name>      string JSON: a live worker's routes and SMTP connection states
    dispatch:routes             zset   route names of the live workers (owned by ``queue.known_routes``)
    dispatch:reconciler         string the lock of the worker reconciling sends this round (30 s)
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import redis

from dispatcher.mail.message import Mail
from dispatcher.queue.states import FINAL_STATES, SendState

PREFIX = "dispatch"
DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)
"""What decoding a bad record hash raises (``UnicodeDecodeError``, ``JSONDecodeError`` are ValueErrors;
KeyError for a missing field; an unknown state is a ValueError of ``SendState``)."""
STATES = tuple(SendState)
LEDGER_TTL = 30 * 86400
KEY_TTL = 30 * 86400
RECORD_TTL = 30 * 86400
STATS_TTL = 3 * 3600
INFLIGHT = f"{PREFIX}:inflight"


def text(value: object) -> str:
    """A Redis reply value as text (the client returns bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


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


def reconciler_lock_key() -> str:
    """Held (SET NX EX) by the one worker whose maintenance reconciles sends this round."""
    return f"{PREFIX}:reconciler"


def delivered_key(minute: int) -> str:
    return f"{PREFIX}:delivered:{minute}"


def mail_summary(mail: Mail, as_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a record keeps of a mail for people and the worker's bookkeeping: headers, envelope,
    attachment names (``as_dict``: ``mail.to_dict()`` when the caller has it already)."""
    summary = dict(mail.to_dict() if as_dict is None else as_dict)
    summary.pop("text", None)
    summary.pop("html", None)
    summary["attachments"] = [
        {"filename": a.filename, "content_type": a.content_type, "size": len(a.content)}
        for a in mail.attachments
    ]
    summary["envelope"] = {"sender": mail.envelope_sender, "recipients": list(mail.envelope_recipients)}
    return summary


def new_send_id(key: str | None) -> str:
    """A key always maps to the same id, so a duplicate enqueue finds the first one."""
    if key is not None:
        return "mail-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return "mail-" + uuid.uuid4().hex


@dataclass
class SendRecord:
    """The decoded hash of one send. ``record`` holds outcomes, attempt history and the failure reason."""

    send_id: str
    mail: dict[str, Any]
    state: SendState
    attempts: int = 0
    generation: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    next_attempt_at: float | None = None
    rq_job: str | None = None
    record: dict[str, Any] = field(default_factory=dict)
    raw: bytes | None = field(default=None, repr=False)
    source: str | None = field(default=None, repr=False)
    stored_state: SendState | None = None
    data_out: int | None = None
    """The attempt whose message data may be on the wire: written (durably, ``mark_data_out``) right
    before its first data byte is sent, cleared when that attempt's outcome is recorded. A record still
    ``sending`` with ``data_out == attempts`` after its worker died may have been delivered."""

    def move(self, target: SendState) -> None:
        """Change the state by the table in ``dispatcher.queue.states`` (``IllegalTransition`` otherwise)."""
        self.state = self.state.to(target)

    @property
    def message_id(self) -> str:
        return str(self.mail["message_id"])

    @property
    def priority(self) -> str:
        return str(self.mail.get("priority", "default"))

    @property
    def route(self) -> str:
        return str(self.mail.get("route", "default"))

    @property
    def sender(self) -> str:
        return str(self.mail["envelope"]["sender"])

    @property
    def recipients(self) -> list[str]:
        return list(self.mail["envelope"]["recipients"])

    @property
    def outcomes(self) -> dict[str, dict[str, Any]]:
        outcomes: dict[str, dict[str, Any]] = self.record.setdefault("outcomes", {})
        return outcomes

    @classmethod
    def from_hash(cls, send_id: str, raw: Mapping[Any, Any]) -> SendRecord:
        message = raw.get(b"raw")
        fields = {text(k): text(v) for k, v in raw.items() if k != b"raw"}
        return cls(
            send_id=send_id,
            mail=json.loads(fields["mail"]),
            state=SendState(fields["state"]),
            attempts=int(fields.get("attempts", 0)),
            generation=int(fields.get("generation", 0)),
            created_at=float(fields.get("created_at", 0)),
            updated_at=float(fields.get("updated_at", 0)),
            next_attempt_at=float(fields["next_attempt_at"]) if fields.get("next_attempt_at") else None,
            rq_job=fields.get("rq_job") or None,
            record=json.loads(fields.get("record") or "{}"),
            raw=message,
            stored_state=SendState(fields["state"]),
            data_out=int(fields["data_out"]) if fields.get("data_out") else None,
        )

    def to_hash(self) -> dict[str, str]:
        """The fields an update writes; the mail itself is written once, when the send is created."""
        fields = {
            "state": self.state,
            "attempts": str(self.attempts),
            "generation": str(self.generation),
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "next_attempt_at": repr(self.next_attempt_at) if self.next_attempt_at is not None else "",
            "rq_job": self.rq_job or "",
            "record": json.dumps(self.record, separators=(",", ":")),
            "data_out": str(self.data_out) if self.data_out is not None else "",
        }
        return fields

    def to_hash_new(self) -> dict[str, str | bytes]:
        """The fields of a send being created (the others start at their defaults), MIME bytes included."""
        fields: dict[str, str | bytes] = {
            "mail": json.dumps(self.mail, separators=(",", ":")),
            "state": self.state,
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "rq_job": self.rq_job or "",
            "record": json.dumps(self.record, separators=(",", ":")),
        }
        if self.next_attempt_at is not None:
            fields["next_attempt_at"] = repr(self.next_attempt_at)
        if self.raw is not None:
            fields["raw"] = self.raw
        return fields

    def status(self) -> dict[str, Any]:
        """The JSON shown by ``enqueue.py status`` and ``GET /api/v1/messages/<id>``."""
        return {
            "id": self.send_id,
            "state": self.state,
            "message_id": self.message_id,
            "route": self.mail.get("route", "default"),
            "priority": self.mail.get("priority", "default"),
            "subject": self.mail.get("subject", ""),
            "attempts": self.attempts,
            "generation": self.generation,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "next_attempt_at": _iso(self.next_attempt_at) if self.next_attempt_at else None,
            "recipients": self.outcomes,
            "last_reply": self.record.get("last_reply"),
            "reason": self.record.get("reason"),
            "history": self.record.get("history", []),
            "transcript": self.record.get("transcript", []),
        }


def _iso(moment: float | None) -> str | None:
    if not moment:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class SendStore:
    """Reads and writes send records; every state change moves the id between the state indexes."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection

    def load(self, send_id: str) -> SendRecord | None:
        raw = self.redis.hgetall(send_key(send_id))
        return SendRecord.from_hash(send_id, raw) if raw else None

    def load_many_tolerant(
        self, send_ids: Iterable[str]
    ) -> tuple[list[SendRecord], list[tuple[str, BaseException]]]:
        """The records of ``send_ids`` that exist (one round trip), each decoded on its own: those that
        cannot be decoded come back apart with what was wrong, so one bad hash breaks no listing."""
        ids = list(send_ids)
        pipe = self.redis.pipeline(transaction=False)
        for send_id in ids:
            pipe.hgetall(send_key(send_id))
        readable: list[SendRecord] = []
        unreadable: list[tuple[str, BaseException]] = []
        for send_id, raw in zip(ids, pipe.execute(), strict=True):
            if not raw:
                continue
            try:
                readable.append(SendRecord.from_hash(send_id, raw))
            except DECODE_ERRORS as exc:
                unreadable.append((send_id, exc))
        return readable, unreadable

    def load_many(self, send_ids: Iterable[str]) -> list[SendRecord]:
        ids = list(send_ids)
        pipe = self.redis.pipeline(transaction=False)
        for send_id in ids:
            pipe.hgetall(send_key(send_id))
        return [SendRecord.from_hash(i, raw) for i, raw in zip(ids, pipe.execute(), strict=True) if raw]

    def mark_data_out(self, send_id: str, attempt: int) -> None:
        """Record, before the first byte of its data is sent, that ``attempt`` may deliver the message.
        One round trip; it raises (and so no data goes out) when Redis does not acknowledge it."""
        self.redis.hset(send_key(send_id), "data_out", str(attempt))

    def ledger(self, message_id: str) -> set[str]:
        return {text(m) for m in self.redis.smembers(ledger_key(message_id))}

    def stage_save(self, pipe: Any, rec: SendRecord, *, now: float | None = None) -> None:
        """Queue the writes that persist ``rec`` and its state index on ``pipe`` (a MULTI pipeline)."""
        rec.updated_at = now or time.time()
        pipe.hset(send_key(rec.send_id), mapping=rec.to_hash())
        if rec.state in FINAL_STATES:
            pipe.expire(send_key(rec.send_id), RECORD_TTL)
            pipe.expire(source_key(rec.send_id), RECORD_TTL)
        elif rec.stored_state in FINAL_STATES:
            pipe.persist(send_key(rec.send_id))
            pipe.persist(source_key(rec.send_id))
        priority = rec.priority
        if rec.stored_state is not None and rec.stored_state != rec.state:
            pipe.zrem(state_key(rec.stored_state), rec.send_id)
            pipe.zrem(state_key(rec.stored_state, priority), rec.send_id)
        pipe.zadd(state_key(rec.state), {rec.send_id: rec.updated_at})
        pipe.zadd(state_key(rec.state, priority), {rec.send_id: rec.updated_at})
        rec.stored_state = rec.state

    def stage_new(self, pipe: Any, recs: list[SendRecord], *, now: float) -> None:
        """Queue the writes creating ``recs`` on ``pipe``: a hash each, and their sources and state-index
        entries in as few commands as possible (bulk enqueue is bounded by Redis commands)."""
        if not recs:
            return
        sources: dict[str, str] = {}
        indexes: dict[str, dict[str, float]] = {}
        for rec in recs:
            rec.updated_at = now
            rec.stored_state = rec.state
            pipe.hset(send_key(rec.send_id), mapping=rec.to_hash_new())
            if rec.source is not None:
                sources[source_key(rec.send_id)] = rec.source
            for key in (state_key(rec.state), state_key(rec.state, rec.priority)):
                indexes.setdefault(key, {})[rec.send_id] = now
        if sources:
            pipe.mset(sources)
        for key, members in indexes.items():
            pipe.zadd(key, members)

    def ids_in_state(self, state: str, *, since: float | None = None, limit: int | None = None) -> list[str]:
        low: float | str = since if since is not None else "-inf"
        start, num = (0, limit) if limit is not None else (None, None)
        ids = self.redis.zrevrangebyscore(state_key(state), "+inf", low, start=start, num=num)
        return [text(i) for i in ids]

    def count_states(self, priority: str | None = None) -> dict[str, int]:
        """Sends per state, over every queue or in one priority's."""
        pipe = self.redis.pipeline(transaction=False)
        for state in STATES:
            pipe.zcard(state_key(state, priority))
        return dict(zip(STATES, pipe.execute(), strict=True))

    def delivered_per_minute(self, minutes: int = 60, *, now: float | None = None) -> list[tuple[int, int]]:
        current = int((now or time.time()) // 60)
        keys = [delivered_key(m) for m in range(current - minutes + 1, current + 1)]
        values = self.redis.mget(keys)
        return [
            (m * 60, int(v or 0))
            for m, v in zip(range(current - minutes + 1, current + 1), values, strict=True)
        ]
