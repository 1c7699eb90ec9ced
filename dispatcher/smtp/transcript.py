"""Every command sent and reply received, as structlog events and as a record of the current send.

Lines reach this module already redacted (AUTH payloads are replaced before they get here); message data
is never logged, only its size.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import structlog

from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

logger = structlog.get_logger("dispatcher.smtp")

MAX_ENTRIES = 200
MAX_UNREPORTED = 64


class Transcript:
    """Emits ``smtp_command`` / ``smtp_reply`` events and keeps the entries of the current send."""

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self.tls_version: str | None = None
        self.entries: list[dict[str, Any]] = []
        self.unreported: deque[Reply] = deque(maxlen=MAX_UNREPORTED)
        """Refusals and 421s read since the last ``take_replies``: the ones a caller recovered from too."""
        self._last_sent = time.monotonic()

    def begin(self) -> None:
        """Start recording a new send: entries of earlier sends are dropped."""
        self.entries = []

    def _record(self, entry: dict[str, Any]) -> None:
        if len(self.entries) < MAX_ENTRIES:
            self.entries.append(entry)

    def command(self, stage: Stage, line: str) -> None:
        self._last_sent = time.monotonic()
        self._record({"dir": "C", "stage": stage.value, "line": line})
        logger.info(
            "smtp_command", conn_id=self.conn_id, stage=stage.value, command=line, tls=self.tls_version
        )

    def data(self, stage: Stage, size: int) -> None:
        self._last_sent = time.monotonic()
        self._record({"dir": "C", "stage": stage.value, "line": f"<{size} bytes of message data>"})
        logger.info("smtp_data", conn_id=self.conn_id, stage=stage.value, bytes=size, tls=self.tls_version)

    def take_replies(self) -> tuple[Reply, ...]:
        """Every non-2xx/3xx reply read since the last call, oldest first (at most ``MAX_UNREPORTED``)."""
        taken = tuple(self.unreported)
        self.unreported.clear()
        return taken

    def reply(self, stage: Stage, reply: Reply) -> None:
        if not (reply.is_positive or reply.is_intermediate):
            self.unreported.append(reply)
        ms = round((time.monotonic() - self._last_sent) * 1000, 2)
        self._record(
            {
                "dir": "S",
                "stage": stage.value,
                "code": reply.code,
                "enhanced": reply.enhanced,
                "text": reply.text,
                "ms": ms,
            }
        )
        logger.info(
            "smtp_reply",
            conn_id=self.conn_id,
            stage=stage.value,
            code=reply.code,
            enhanced=reply.enhanced,
            text=reply.text,
            ms=ms,
            tls=self.tls_version,
        )

    def event(self, name: str, **fields: Any) -> None:
        self._record({"dir": "-", "event": name, **fields})
        logger.info(name, conn_id=self.conn_id, **fields)
