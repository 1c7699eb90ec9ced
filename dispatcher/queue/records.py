"""What a send's record holds, typed: ``SendRecord`` with each recipient's ``RecipientRecord``, the
``Reason`` it is not delivered, and its ``HistoryEntry`` list.

The record is stored as one JSON object (the ``record`` field of ``dispatch:send:<id>``, ``queue.store``);
``SendRecord.from_hash`` decodes it into these types and ``to_hash`` writes the same JSON back, so what
``enqueue.py status`` and the HTTP API show (``SendRecord.status``) and what older records hold keep one
shape. A value of the wrong type is a ``TypeError``/``ValueError`` on decoding: the record is unreadable
(``queue.recovery`` quarantines it), never half-read.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from json import encoder as json_encoder
from typing import Any

from dispatcher.mail.message import Mail
from dispatcher.queue.states import SendState

HISTORY_KEPT = 50
"""The newest history entries a record keeps."""
SUMMARY_FIELDS = ("mail", "state", "attempts", "generation", "created_at", "updated_at", "next_attempt_at",
                  "rq_job", "record", "data_out")  # fmt: skip
"""The hash fields of a record but the mail itself (``raw``, ``source``): what a listing reads."""
_MAIL_BYTES = (b"raw", b"source")


class DeliveryStatus(enum.StrEnum):
    """Where one recipient of a send stands. ``pending``: not offered yet (or offered again by a retry);
    the others are the last attempt's verdict (``delivery.verdicts``)."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"

    @property
    def open(self) -> bool:
        """Whether the next attempt sends to this recipient."""
        return self in (DeliveryStatus.PENDING, DeliveryStatus.TRANSIENT)


def _optional(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = data.get(key)
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise TypeError(f"{key} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
    return value


_NO_REPLY = (None, None, None, None, None, None)


@dataclass(frozen=True, slots=True)
class RecipientRecord:
    """One recipient's outcome: its status and, once an attempt decided it, the reply (or detail) why."""

    status: DeliveryStatus = DeliveryStatus.PENDING
    stage: str | None = None
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    kind: str | None = None
    at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        if (self.stage, self.code, self.enhanced, self.text, self.kind, self.at) == _NO_REPLY:
            return {"status": self.status.value}  # no reply yet: as RecipientRecord(status) writes it
        return {"status": self.status.value, "stage": self.stage, "code": self.code,
                "enhanced": self.enhanced, "text": self.text, "kind": self.kind, "at": self.at}  # fmt: skip

    @classmethod
    def from_dict(cls, data: object) -> RecipientRecord:
        if not isinstance(data, Mapping):
            raise TypeError("a recipient's outcome must be an object")
        return cls(
            status=DeliveryStatus(data.get("status", "pending")),
            stage=_optional(data, "stage", str),
            code=_optional(data, "code", int),
            enhanced=_optional(data, "enhanced", str),
            text=_optional(data, "text", str),
            kind=_optional(data, "kind", str),
            at=_optional(data, "at", (int, float)),
        )

    def pending_again(self) -> RecipientRecord:
        """The same outcome, offered again (an operator's retry): the last reply stays for reference."""
        return dataclasses.replace(self, status=DeliveryStatus.PENDING)


PENDING = RecipientRecord()
"""A new send's outcome for each recipient (frozen: one value shared by them all)."""


@dataclass(frozen=True, slots=True)
class Reason:
    """Why a send is not delivered, in the shape the dashboard groups by (``queue.operations``)."""

    kind: str
    text: str
    stage: str | None = None
    code: int | None = None
    enhanced: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "stage": self.stage, "code": self.code, "enhanced": self.enhanced,
                "text": self.text}  # fmt: skip

    @classmethod
    def from_dict(cls, data: object) -> Reason:
        if not isinstance(data, Mapping):
            raise TypeError("a reason must be an object")
        return cls(
            kind=str(data.get("kind") or "message"),
            text=str(data.get("text") or ""),
            stage=_optional(data, "stage", str),
            code=_optional(data, "code", int),
            enhanced=_optional(data, "enhanced", str),
        )


_HISTORY_FIELDS = ("at", "event", "attempt", "generation", "ms", "conn_id", "worker", "job_id",
                   "outcomes", "reply")  # fmt: skip


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """One line of a send's history: an attempt (``event`` None: its time, connection, worker, job, each
    recipient's status and the deciding reply) or an event (``retry_requested``, ``worker_lost``,
    ``reconciled``, …) with its ``details``."""

    at: float
    event: str | None = None
    attempt: int | None = None
    generation: int | None = None
    ms: float | None = None
    conn_id: str | None = None
    worker: str | None = None
    job_id: str | None = None
    outcomes: Mapping[str, str] | None = None
    reply: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        for name in _HISTORY_FIELDS:
            value = getattr(self, name)
            if value is not None or (self.event is None and name in ("conn_id", "reply")):
                data[name] = dict(value) if name == "outcomes" else value
        data.update(self.details)
        return data

    @classmethod
    def from_dict(cls, data: object) -> HistoryEntry:
        if not isinstance(data, Mapping):
            raise TypeError("a history entry must be an object")
        outcomes = data.get("outcomes")
        if outcomes is not None and not isinstance(outcomes, Mapping):
            raise TypeError("a history entry's outcomes must be an object")
        return cls(
            at=float(data.get("at") or 0.0),
            event=_optional(data, "event", str),
            attempt=_optional(data, "attempt", int),
            generation=_optional(data, "generation", int),
            ms=_optional(data, "ms", (int, float)),
            conn_id=_optional(data, "conn_id", str),
            worker=_optional(data, "worker", str),
            job_id=_optional(data, "job_id", str),
            outcomes={str(k): str(v) for k, v in outcomes.items()} if outcomes is not None else None,
            reply=_optional(data, "reply", str),
            details={k: v for k, v in data.items() if k not in _HISTORY_FIELDS},
        )


def mail_summary(
    mail: Mail, as_dict: dict[str, Any] | None = None, *, in_place: bool = False
) -> dict[str, Any]:
    """What a record keeps of a mail for people and the worker's bookkeeping: headers, envelope,
    attachment names (``as_dict``: ``mail.to_dict()`` when the caller has it already; ``in_place``: the
    caller is done with it, it becomes the summary instead of a copy)."""
    if as_dict is None:
        as_dict, in_place = mail.to_dict(), True
    summary = as_dict if in_place else dict(as_dict)
    summary.pop("text", None)
    summary.pop("html", None)
    summary["attachments"] = [
        {"filename": a.filename, "content_type": a.content_type, "size": len(a.content)}
        for a in mail.attachments
    ]
    summary["envelope"] = {"sender": mail.envelope_sender, "recipients": list(mail.envelope_recipients)}
    return summary


_COMPACT = json.JSONEncoder(separators=(",", ":"))


def compact_json(value: Any) -> str:
    """``json.dumps(value, separators=(",", ":"))``, the same text, from one encoder built once (``dumps``
    with arguments builds one per call: a few µs, three times per mail a bulk enqueue stores)."""
    return _COMPACT.encode(value)


_C_MAKE_ENCODER: Any = getattr(json_encoder, "c_make_encoder", None)  # None without the _json C module
_TREE_ENCODER: Any = (
    None
    if _C_MAKE_ENCODER is None
    else _C_MAKE_ENCODER(None, _COMPACT.default, json_encoder.encode_basestring_ascii, None, ":", ",",
                         False, False, True)
)  # fmt: skip
"""The C encoder ``_COMPACT.encode`` makes anew on every call (with the same settings), made once — without
the dict of containers it is inside of, which only detects a cycle (and is not for two threads at once)."""


def tree_json(value: Any) -> str:
    """``compact_json(value)``, the same text, for a value without cycles (a mail's JSON form, a record
    decoded from JSON): no cycle check, no per-call set-up, about 2 µs less a call. A cycle would be a
    ``RecursionError`` here instead of ``compact_json``'s ``ValueError``."""
    if _TREE_ENCODER is None:
        return compact_json(value)
    return "".join(_TREE_ENCODER(value, 0))


_LAST_FLOAT: tuple[float, str] = (0.0, "0.0")


def _float_text(value: float) -> str:
    """``repr(value)``, remembered for the last float object given: the sends a batch creates share one
    ``now`` for their creation and update times (two ``repr`` calls a mail otherwise)."""
    global _LAST_FLOAT
    last = _LAST_FLOAT
    if value is last[0]:
        return last[1]
    text = repr(value)
    _LAST_FLOAT = (value, text)
    return text


def new_send_id(key: str | None) -> str:
    """A key always maps to the same id, so a duplicate enqueue finds the first one."""
    if key is not None:
        return "mail-" + hashlib.sha256(key.encode()).hexdigest()[:32]
    return "mail-" + uuid4_hex()


def uuid4_hex() -> str:
    """``uuid.uuid4().hex``: 16 random bytes with the version 4 and RFC 4122 variant bits set, without
    building a ``UUID`` (a third of the cost)."""
    octets = bytearray(os.urandom(16))
    octets[6] = (octets[6] & 0x0F) | 0x40
    octets[8] = (octets[8] & 0x3F) | 0x80
    return octets.hex()


def text(value: object) -> str:
    """A Redis reply value as text (the client returns bytes unless told to decode)."""
    return value.decode() if isinstance(value, bytes) else str(value)


_RECORD_FIELDS = ("outcomes", "history", "reason", "last_reply", "transcript", "first_attempt_at",
                  "delivered_via")  # fmt: skip


@dataclass
class SendRecord:
    """The decoded hash of one send: its state and counters, and what its attempts found."""

    send_id: str
    mail: dict[str, Any]
    state: SendState
    attempts: int = 0
    generation: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    next_attempt_at: float | None = None
    rq_job: str | None = None
    outcomes: dict[str, RecipientRecord] = field(default_factory=dict)
    history: list[HistoryEntry] = field(default_factory=list)
    reason: Reason | None = None
    last_reply: dict[str, Any] | None = None
    """The deciding reply of the last attempt (``Reply.to_dict``)."""
    transcript: list[dict[str, Any]] = field(default_factory=list)
    """The redacted SMTP transcript of the last attempt that was not accepted in full."""
    first_attempt_at: float | None = None
    """When this retry budget's first attempt began (the message's age counts from it)."""
    delivered_via: str | None = None
    """The fallback route that carried the send, when it was not its own."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Fields of the stored record this version does not know: kept as they are."""
    raw: bytes | None = field(default=None, repr=False)
    """The MIME message as given (a send enqueued as MIME), or as built by this attempt."""
    source: bytes | None = field(default=None, repr=False)
    """The whole mail as JSON, which the worker builds the MIME message from (``raw`` is None then);
    None when the record was loaded without it (listings), or a send from before the mail moved into
    its record (``keys.legacy_source_key``)."""
    legacy_source: bool = field(default=False, repr=False)
    """Loaded without ``raw`` or ``source`` in the hash: the mail is at ``keys.legacy_source_key`` (a send
    enqueued before the mail moved into its record), or the load left the mail out (``SendStore.load``)."""
    stored_state: SendState | None = None
    data_out: int | None = None
    """The attempt whose message data may be on the wire: written (durably, ``mark_data_out``) right
    before its first data byte is sent, cleared when that attempt's outcome is recorded. A record still
    ``sending`` with ``data_out == attempts`` after its worker died may have been delivered."""

    def move(self, target: SendState) -> None:
        """Change the state by the table in ``dispatcher.queue.states`` (``IllegalTransition`` otherwise)."""
        self.state = self.state.to(target)

    def note(self, entry: HistoryEntry) -> None:
        """Add ``entry`` to the history (the newest ``HISTORY_KEPT`` are kept)."""
        self.history.append(entry)
        del self.history[:-HISTORY_KEPT]

    def status_of(self, recipient: str) -> DeliveryStatus:
        outcome = self.outcomes.get(recipient)
        return outcome.status if outcome is not None else DeliveryStatus.PENDING

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

    # -- the stored form ------------------------------------------------------------------------------

    def record_json(self) -> dict[str, Any]:
        """The ``record`` field's JSON object."""
        data: dict[str, Any] = dict(self.extra)
        data["outcomes"] = {r: o.to_dict() for r, o in self.outcomes.items()}
        data["history"] = [h.to_dict() for h in self.history]
        data["reason"] = self.reason.to_dict() if self.reason is not None else None
        if self.last_reply is not None:
            data["last_reply"] = self.last_reply
        if self.transcript:
            data["transcript"] = self.transcript
        if self.first_attempt_at is not None:
            data["first_attempt_at"] = self.first_attempt_at
        if self.delivered_via is not None:
            data["delivered_via"] = self.delivered_via
        return data

    def load_record_json(self, data: object) -> None:
        """Set the typed fields from a ``record`` JSON object (``TypeError``/``ValueError`` if it is not
        one of the right shape)."""
        if not isinstance(data, dict):
            raise TypeError("the record must be a JSON object")
        outcomes = data.get("outcomes", {}) if data.get("outcomes") is not None else {}
        history = data.get("history", []) if data.get("history") is not None else []
        transcript = data.get("transcript", []) if data.get("transcript") is not None else []
        last_reply = data.get("last_reply")
        if not (isinstance(outcomes, dict) and isinstance(history, list) and isinstance(transcript, list)):
            raise TypeError("outcomes must be an object, history and transcript lists")
        if last_reply is not None and not isinstance(last_reply, dict):
            raise TypeError("last_reply must be an object")
        self.outcomes = {str(r): RecipientRecord.from_dict(o) for r, o in outcomes.items()}
        self.history = [HistoryEntry.from_dict(h) for h in history]
        self.reason = Reason.from_dict(data["reason"]) if data.get("reason") is not None else None
        self.last_reply = last_reply
        self.transcript = transcript
        self.first_attempt_at = _optional(data, "first_attempt_at", (int, float))
        self.delivered_via = _optional(data, "delivered_via", str)
        self.extra = {k: v for k, v in data.items() if k not in _RECORD_FIELDS}

    @classmethod
    def from_hash(cls, send_id: str, raw: Mapping[Any, Any]) -> SendRecord:
        message = raw.get(b"raw")
        fields = {text(k): text(v) for k, v in raw.items() if k not in _MAIL_BYTES}
        rec = cls(
            send_id=send_id,
            mail=json.loads(fields["mail"]),
            state=SendState(fields["state"]),
            attempts=int(fields.get("attempts", 0)),
            generation=int(fields.get("generation", 0)),
            created_at=float(fields.get("created_at", 0)),
            updated_at=float(fields.get("updated_at", 0)),
            next_attempt_at=float(fields["next_attempt_at"]) if fields.get("next_attempt_at") else None,
            rq_job=fields.get("rq_job") or None,
            raw=message,
            source=raw.get(b"source"),
            legacy_source=b"raw" not in raw and b"source" not in raw,
            stored_state=SendState(fields["state"]),
            data_out=int(fields["data_out"]) if fields.get("data_out") else None,
        )
        rec.load_record_json(json.loads(fields.get("record") or "{}"))
        return rec

    def to_hash(self) -> dict[str, str]:
        """The fields an update writes; the mail itself is written once, when the send is created."""
        return {
            "state": self.state,
            "attempts": str(self.attempts),
            "generation": str(self.generation),
            "created_at": repr(self.created_at),
            "updated_at": repr(self.updated_at),
            "next_attempt_at": repr(self.next_attempt_at) if self.next_attempt_at is not None else "",
            "rq_job": self.rq_job or "",
            "record": compact_json(self.record_json()),
            "data_out": str(self.data_out) if self.data_out is not None else "",
        }

    def to_hash_new(self) -> dict[str, str | bytes]:
        """The fields of a send being created (the others start at their defaults), MIME bytes included."""
        fields: dict[str, str | bytes] = {
            "mail": tree_json(self.mail),
            "state": self.state,
            "created_at": _float_text(self.created_at),
            "updated_at": _float_text(self.updated_at),
            "rq_job": self.rq_job or "",
            "record": self._new_record_text(),
            "priority": self.priority,
        }
        if self.next_attempt_at is not None:
            fields["next_attempt_at"] = repr(self.next_attempt_at)
        if self.raw is not None:
            fields["raw"] = self.raw
        if self.source is not None:
            fields["source"] = self.source
        return fields

    def _new_record_text(self) -> str:
        """``compact_json(self.record_json())``, the same text; written directly for the record of a send
        just created (every recipient pending, nothing else yet: what a bulk enqueue stores per mail)."""
        if (
            self.extra or self.history or self.reason is not None or self.last_reply is not None
            or self.transcript or self.first_attempt_at is not None or self.delivered_via is not None
        ) or not all(
            (outcome is PENDING or outcome == PENDING) and isinstance(recipient, str)
            for recipient, outcome in self.outcomes.items()
        ):  # fmt: skip
            return compact_json(self.record_json())
        encode = json_encoder.encode_basestring_ascii
        outcomes = ",".join([f'{encode(r)}:{{"status":"pending"}}' for r in self.outcomes])
        return f'{{"outcomes":{{{outcomes}}},"history":[],"reason":null}}'

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
            "recipients": {r: o.to_dict() for r, o in self.outcomes.items()},
            "last_reply": self.last_reply,
            "reason": self.reason.to_dict() if self.reason is not None else None,
            "history": [h.to_dict() for h in self.history],
            "transcript": self.transcript,
        }


def _iso(moment: float | None) -> str | None:
    if not moment:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
