"""The counting sink every MTA of the interop suite relays to.

It is dispatcher's own development sink (``dispatcher.dev.devsink.DevSink``: aiosmtpd on 127.0.0.1, a free
port, SMTPUTF8 on; aiosmtpd always offers 8BITMIME and keeps the data as bytes) with what the checks
need on top: each delivery as a ``Delivery`` (envelope sender, recipients, data bytes, Message-ID), and
waits on a predicate over the deliveries with a deadline. Thread-safe: aiosmtpd runs on its own loop
thread and every read takes DevSink's lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32

from dispatcher.dev.devsink import DevSink, ReceivedMessage

POLL = 0.05
"""Longest wait between two looks at a predicate (a delivery wakes the waiter at once)."""


@dataclass(frozen=True)
class Delivery:
    """One message as the sink received it: ``data`` un-dot-stuffed, CRLF line endings."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    message_id: str
    """The Message-ID header's value, angle brackets and spaces stripped ("" when absent)."""
    connection_id: int

    @property
    def header_block(self) -> bytes:
        return split_message(self.data)[0]

    @property
    def body(self) -> bytes:
        return split_message(self.data)[1]


def split_message(data: bytes) -> tuple[bytes, bytes]:
    """Header block (with its final CRLF) and body: split at the first empty line."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return data, b""
    return head + b"\r\n", body


def bare_message_id(value: str) -> str:
    return value.strip().strip("<>").strip()


def message_id_of(data: bytes) -> str:
    headers = BytesHeaderParser(policy=compat32).parsebytes(split_message(data)[0])
    value = headers.get("Message-ID")
    return bare_message_id(str(value)) if value is not None else ""


def _delivery(message: ReceivedMessage) -> Delivery:
    return Delivery(
        sender=message.mail_from,
        recipients=tuple(message.rcpt_tos),
        data=message.data,
        message_id=message_id_of(message.data),
        connection_id=message.connection_id,
    )


Predicate = Callable[[Sequence[Delivery]], bool]


class CountingSink(DevSink):
    """``DevSink`` on 127.0.0.1 (free port) that hands out ``Delivery`` records and waits on them."""

    def __init__(self) -> None:
        super().__init__(host="127.0.0.1", port=0, smtputf8=True, pipelining=True)
        self._parsed: list[Delivery] = []

    @property
    def deliveries(self) -> list[Delivery]:
        """A snapshot of every delivery so far, in arrival order."""
        messages = self.messages
        with self._cond:
            for message in messages[len(self._parsed) :]:
                self._parsed.append(_delivery(message))
            return list(self._parsed[: len(messages)])

    def with_message_id(self, message_id: str) -> list[Delivery]:
        wanted = bare_message_id(message_id)
        return [d for d in self.deliveries if d.message_id == wanted]

    def wait_for(self, predicate: Predicate, timeout: float) -> bool:
        """Wait until ``predicate(deliveries)`` holds; False when ``timeout`` seconds pass first.

        The predicate is looked at again whenever a message arrives (at the latest every ``POLL``
        seconds) and once more at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self.deliveries):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with self._cond:
                self._cond.wait_for(self._arrived_after(len(self._messages)), timeout=min(remaining, POLL))

    def _arrived_after(self, seen: int) -> Callable[[], bool]:
        return lambda: len(self._messages) != seen

    def stays_false(self, predicate: Predicate, duration: float) -> bool:
        """True when ``predicate(deliveries)`` is still false after ``duration`` seconds (a quiet period:
        how a check sees that no late duplicate or stray delivery comes)."""
        return not self.wait_for(predicate, duration)
