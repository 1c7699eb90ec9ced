"""A test outbox for apps' own tests: ``with dispatcher.testing.outbox() as sent:`` captures every mail the
producer would have enqueued — validated (templates rendered, Message-ID fixed) — instead of writing it to
Redis, so a test asserts what was enqueued without a Redis server.

The producer consults :func:`capturing` at its one choke point (``Producer.enqueue_valid``); Django's
``dispatcher.django.TestBackend`` and the pytest fixture ``dispatcher_outbox``
(:mod:`dispatcher.pytest_plugin`) use the same outboxes. Outboxes are process-wide (a web app's test
client may serve requests on other threads) and nest: every open one sees each mail.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dispatcher.mail.message import Mail

_lock = threading.Lock()
_open: list[Outbox] = []


class Outbox:
    """The mails captured while it was open, in order; ``find`` and ``one`` select them by field."""

    def __init__(self) -> None:
        self.mails: list[Mail] = []

    def __len__(self) -> int:
        return len(self.mails)

    def __iter__(self) -> Iterator[Mail]:
        return iter(self.mails)

    def __getitem__(self, index: int) -> Mail:
        return self.mails[index]

    def clear(self) -> None:
        self.mails.clear()

    def find(self, **fields: Any) -> list[Mail]:
        """Mails whose JSON form has each field equal to the value given; ``to``, ``cc``, ``bcc`` match when
        the address is among the mail's recipients there, ``template`` matches the template it came from.
        e.g. ``find(to="ann@example.org", subject="Welcome")``."""
        return [mail for mail in self.mails if all(_matches(mail, k, v) for k, v in fields.items())]

    def one(self, **fields: Any) -> Mail:
        """The single mail ``find`` selects; ``AssertionError`` listing what was captured otherwise."""
        found = self.find(**fields)
        if len(found) != 1:
            captured = [(m.to_dict().get("to"), m.subject) for m in self.mails]
            raise AssertionError(f"{len(found)} mails match {fields}; captured (to, subject): {captured}")
        return found[0]


def _matches(mail: Mail, name: str, expected: Any) -> bool:
    as_dict = mail.to_dict()
    if name in ("to", "cc", "bcc", "reply_to"):
        wanted = [expected] if isinstance(expected, str) else list(expected)
        have = {a.addr_spec.casefold() for a in getattr(mail, name)} | {
            a.formatted().casefold() for a in getattr(mail, name)
        }
        return all(str(w).casefold() in have for w in wanted)
    if name == "template":
        return bool(mail.metadata.get("template") == expected)
    return bool(as_dict.get(name) == expected)


@contextmanager
def outbox() -> Iterator[Outbox]:
    """Capture instead of enqueue while the ``with`` block runs; yields the ``Outbox``."""
    box = Outbox()
    with _lock:
        _open.append(box)
    try:
        yield box
    finally:
        with _lock:
            _open.remove(box)


def capturing() -> bool:
    """True while an outbox is open: the producer then records instead of writing to Redis."""
    return bool(_open)


def record(mail: Mail) -> None:
    """Give ``mail`` to every open outbox."""
    with _lock:
        for box in _open:
            box.mails.append(mail)
