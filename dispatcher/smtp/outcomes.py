"""What a transaction did to each recipient: ``RecipientStatus``, ``RecipientOutcome``, ``SendResult``.

Values only; the rules that produce them are the decision table of ``dispatcher.smtp.protocol``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage


class RecipientStatus(enum.StrEnum):
    ACCEPTED = "accepted"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class RecipientOutcome:
    recipient: str
    status: RecipientStatus
    stage: Stage
    reply: Reply | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "recipient": self.recipient,
            "status": self.status.value,
            "stage": self.stage.value,
            "reply": self.reply.to_dict() if self.reply else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RecipientOutcome:
        reply = Reply.from_dict(data["reply"]) if data.get("reply") else None
        return cls(data["recipient"], RecipientStatus(data["status"]), Stage(data["stage"]), reply)


BAD_SEQUENCE = 503


def status_of(reply: Reply) -> RecipientStatus:
    """2xx accepted, 4xx transient, 5xx permanent — except 503: not executed, never a verdict."""
    if reply.is_positive:
        return RecipientStatus.ACCEPTED
    if reply.is_transient or reply.code == BAD_SEQUENCE:
        return RecipientStatus.TRANSIENT
    return RecipientStatus.PERMANENT


@dataclass(frozen=True, slots=True)
class SendResult:
    """What happened to each recipient of one transaction. ``reply`` is the reply that decided the end."""

    outcomes: tuple[RecipientOutcome, ...]
    reply: Reply | None
    conn_id: str = ""
    transcript: tuple[dict[str, Any], ...] = ()
    round_trips: int = 0

    def with_status(self, status: RecipientStatus) -> tuple[str, ...]:
        return tuple(o.recipient for o in self.outcomes if o.status is status)

    @property
    def accepted(self) -> tuple[str, ...]:
        return self.with_status(RecipientStatus.ACCEPTED)

    @property
    def transient(self) -> tuple[str, ...]:
        return self.with_status(RecipientStatus.TRANSIENT)

    @property
    def permanent(self) -> tuple[str, ...]:
        return self.with_status(RecipientStatus.PERMANENT)
