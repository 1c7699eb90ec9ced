"""Every command sent and reply received, as structlog events and as a record of the current send.

What is logged at INFO — every line, once:
- a **transaction's** lines (from its ``RSET`` / ``MAIL`` to its last reply, and the RSET after a failed
  one) are one ``smtp_transaction`` event when it ends, its ``lines`` in the order they went and came
  (``"rcpt > RCPT TO:<b@y.org>"``, ``"rcpt < 250 2.1.5 OK (0.31 ms)"``), WARNING when it broke (with
  ``error``); each of its lines is also its own ``smtp_command`` / ``smtp_reply`` / ``smtp_data`` event at
  DEBUG — made only when DEBUG is enabled (asked once per transaction), so they cost nothing at INFO;
- the **connection's** own lines — greeting, EHLO, STARTTLS, AUTH, NOOP, QUIT — are their own
  ``smtp_command`` / ``smtp_reply`` events at INFO, as are its events (``smtp_connected``,
  ``smtp_tls_established``, ``smtp_reconnect``, ``smtp_closed``…).

Lines reach this module already redacted (AUTH payloads are replaced before they get here); message data
is never logged, only its size.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import structlog

from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

logger = structlog.get_logger("dispatcher.smtp")

MAX_ENTRIES = 200
MAX_UNREPORTED = 64


class TransactionLog:
    """The lines of one transaction, for its ``smtp_transaction`` event, and its transcript entries."""

    __slots__ = ("debug", "entries", "lines", "started")

    def __init__(self, debug: bool, entries: list[dict[str, Any]] | None = None) -> None:
        self.lines: list[str] = []
        self.entries: list[dict[str, Any]] = entries if entries is not None else []
        """Its commands and replies as the record keeps them (a message sent again continues its list)."""
        self.started = time.monotonic()
        self.debug = debug
        """Each line is also its own DEBUG event (DEBUG was enabled when the transaction began)."""


def _debug_enabled() -> bool:
    enabled = getattr(logger, "is_enabled_for", None)  # structlog's filtering loggers have it
    return True if enabled is None else bool(enabled(logging.DEBUG))


class Transcript:
    """Emits the events of one connection and keeps the entries of the current send.

    A line belongs to the transaction ``select``ed when it is written or read (the stream interleaves
    several); with none selected it is the connection's own.
    """

    def __init__(self, conn_id: str) -> None:
        self.conn_id = conn_id
        self.tls_version: str | None = None
        self.entries: list[dict[str, Any]] = []
        self.connection_entries: list[dict[str, Any]] = []
        """The entries of the current send that belong to no transaction: the connection's own."""
        self.by_message: dict[str, TransactionLog] = {}
        """The transactions of a stream's messages, by the message's key (``for_message``)."""
        self.unreported: deque[Reply] = deque(maxlen=MAX_UNREPORTED)
        """Refusals and 421s read since the last ``take_replies``: the ones a caller recovered from too."""
        self.current: TransactionLog | None = None
        self._last_sent = time.monotonic()

    def begin(self) -> None:
        """Start recording a new send: entries of earlier sends are dropped."""
        self.entries = []
        self.connection_entries = []
        self.by_message = {}
        self.current = None

    def transaction(self, key: str | None = None) -> TransactionLog:
        """A new transaction's log (not selected yet); ``key``: a stream's message, whose own transcript
        ``for_message`` gives (a message sent again continues its entries)."""
        if key is None:
            return TransactionLog(_debug_enabled())
        earlier = self.by_message.get(key)
        log = TransactionLog(_debug_enabled(), earlier.entries if earlier is not None else None)
        self.by_message[key] = log
        return log

    def for_message(self, key: str) -> tuple[dict[str, Any], ...]:
        """What a stream's message should keep as its transcript: the connection's own lines and its own
        transaction's — never another message's envelope (the whole send's entries when ``key`` was not
        one of the stream's transactions)."""
        log = self.by_message.get(key)
        if log is None:
            return tuple(self.entries)
        return (*self.connection_entries, *log.entries)

    def select(self, log: TransactionLog | None) -> None:
        """The lines from now on are ``log``'s (``None``: the connection's own)."""
        self.current = log

    @contextlib.contextmanager
    def logged_transaction(self) -> Iterator[TransactionLog]:
        """The lines of the block are one transaction's, told when the block ends (an error: it broke)."""
        log = self.transaction()
        self.select(log)
        try:
            yield log
        except BaseException as exc:
            self.finish(log, exc)
            raise
        self.finish(log)

    def finish(self, log: TransactionLog, error: BaseException | None = None) -> None:
        """``log``'s transaction ended (``error``: it broke): its one ``smtp_transaction`` event."""
        if self.current is log:
            self.current = None
        ms = round((time.monotonic() - log.started) * 1000, 2)
        conn, tls = self.conn_id, self.tls_version
        if error is None:
            logger.info("smtp_transaction", conn_id=conn, tls=tls, lines=log.lines, ms=ms)
        else:
            reason = str(error) or type(error).__name__
            logger.warning("smtp_transaction", conn_id=conn, tls=tls, lines=log.lines, ms=ms, error=reason)

    def _record(self, entry: dict[str, Any]) -> None:
        if len(self.entries) < MAX_ENTRIES:
            self.entries.append(entry)
        own = self.connection_entries if self.current is None else self.current.entries
        if len(own) < MAX_ENTRIES:
            own.append(entry)

    def command(self, stage: Stage, line: str) -> None:
        self._sent(stage, line, "smtp_command", command=line)

    def data(self, stage: Stage, size: int) -> None:
        self._sent(stage, f"<{size} bytes of message data>", "smtp_data", bytes=size)

    def _sent(self, stage: Stage, line: str, event: str, **fields: Any) -> None:
        self._last_sent = time.monotonic()
        entry = {"dir": "C", "stage": stage.value, "line": line}
        self._told(entry, f"{stage.value} > {line}", event, **fields)

    def _told(self, entry: dict[str, Any], summary: str, event: str, **fields: Any) -> None:
        """A line written or read: recorded, ``summary`` among the selected transaction's lines, its own event
        (INFO for the connection's own lines, DEBUG — made only when enabled — for a transaction's)."""
        self._record(entry)
        log = self.current
        if log is not None:
            log.lines.append(summary)
            if not log.debug:
                return
        (logger.info if log is None else logger.debug)(
            event, conn_id=self.conn_id, stage=entry["stage"], **fields, tls=self.tls_version
        )

    def take_replies(self) -> tuple[Reply, ...]:
        """Every non-2xx/3xx reply read since the last call, oldest first (at most ``MAX_UNREPORTED``)."""
        taken = tuple(self.unreported)
        self.unreported.clear()
        return taken

    def reply(self, stage: Stage, reply: Reply) -> None:
        if not (reply.is_positive or reply.is_intermediate):
            self.unreported.append(reply)
        ms = round((time.monotonic() - self._last_sent) * 1000, 2)
        entry = {"dir": "S", "stage": stage.value, "code": reply.code, "enhanced": reply.enhanced,
                 "text": reply.text, "ms": ms}  # fmt: skip
        self._told(entry, f"{stage.value} < {reply.code} {reply.text} ({ms} ms)", "smtp_reply",
                   code=reply.code, enhanced=reply.enhanced, text=reply.text, ms=ms)  # fmt: skip

    def event(self, name: str, **fields: Any) -> None:
        self._record({"dir": "-", "event": name, **fields})
        logger.info(name, conn_id=self.conn_id, **fields)
