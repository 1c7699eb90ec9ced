"""An injected ``ConnectionPermit``: taken before the TCP connect, given back whenever the connection ends
(QUIT, abort, a failed connect) — the contract a route's connection slot (``routes.slots``) relies on."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from client_support import url
from helpers import free_port
from servers import RecordingSmtpServer

from dispatcher.errors import ConnectError, ThrottleTimeout
from dispatcher.smtp import SmtpClient
from dispatcher.smtp.stages import Stage

Sink = Callable[..., RecordingSmtpServer]


class CountingPermit:
    def __init__(self, grant: bool = True) -> None:
        self.grant, self.held, self.events = grant, False, []  # type: ignore[var-annotated]

    def acquire(self) -> None:
        self.events.append("acquire")
        if not self.grant:
            raise ThrottleTimeout("no slot", stage=Stage.CONNECT)
        self.held = True

    def release(self) -> None:
        self.events.append("release")
        self.held = False

    def take(self, max_wait: float) -> bool:
        return self.grant

    def share(self) -> None:
        pass

    def in_use(self) -> contextlib.AbstractContextManager[object]:
        return contextlib.nullcontext()


def test_held_while_the_connection_is_open_and_given_back_at_quit(smtp_server: Sink) -> None:
    sink = smtp_server()
    permit = CountingPermit()
    client = SmtpClient.from_url(url(sink.port))
    client.permit = permit
    client.send("a@x.org", ["b@y.org"], b"one\r\n")
    client.send("a@x.org", ["b@y.org"], b"two\r\n")
    assert permit.held and permit.events == ["acquire"]  # one connection, one acquire
    client.close()
    assert not permit.held and permit.events == ["acquire", "release"]


def test_given_back_when_the_connect_fails(smtp_server: Sink) -> None:
    permit = CountingPermit()
    client = SmtpClient.from_url(url(free_port()))
    client.permit = permit
    with pytest.raises(ConnectError):
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert not permit.held and permit.events == ["acquire", "release"]


def test_no_permit_no_connection(smtp_server: Sink) -> None:
    sink = smtp_server()
    client = SmtpClient.from_url(url(sink.port))
    client.permit = CountingPermit(grant=False)
    with pytest.raises(ThrottleTimeout):
        client.send("a@x.org", ["b@y.org"], b"x\r\n")
    assert sink.connections == 0
