"""``ConnectionPermit``: what an ``SmtpClient`` must hold while its connection is open, injected by the
code that limits connections (a route's slots, ``routes.slots``) — the SMTP client knows only this."""

from __future__ import annotations

import contextlib
from typing import Protocol


class ConnectionPermit(Protocol):
    """What a connection must hold while it is open — a route's connection slot (``routes.slots``) — given
    to the client, which only takes it before the TCP connect and gives it back when the connection ends.
    The rest (waiting for it in a job, sharing it with waiting workers) is its owner's business."""

    def acquire(self) -> None:
        """Hold the permit (waiting as its owner allows); raise an ``SmtpError`` when it does not come."""

    def release(self) -> None:
        """The connection ended (QUIT, abort, failure, retirement)."""

    def take(self, max_wait: float) -> bool:
        """Hold the permit, waiting up to ``max_wait`` seconds; True when it is held."""

    def share(self) -> None:
        """A send ended: give the permit (and so the connection) up if others wait for one."""

    def in_use(self) -> contextlib.AbstractContextManager[object]:
        """Held while a job uses the client, so the permit's owner never closes it mid-send."""
