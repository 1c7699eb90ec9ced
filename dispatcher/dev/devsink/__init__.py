"""Development SMTP sink: accepts mail on a local port, records everything, optionally stores .eml files.

Used by ``make demo`` (``python -m dispatcher.dev.devsink``) and by the tests' ``smtp_server`` fixture.
It runs aiosmtpd's protocol on an asyncio loop in a background thread and adds what a test needs to see:

* every command line exactly as received (``commands``) — observed by wrapping the protocol's stream reader,
  so lines aiosmtpd rejects (unknown verbs, 530 before STARTTLS) are recorded too;
* every accepted message with its envelope and exact bytes (``messages``);
* connection counts (total, current, peak) and EHLO count;
* per-recipient RCPT rules ("answer 450 once, then accept") to exercise retries.

aiosmtpd does not advertise PIPELINING although it handles pipelined commands (it reads one line at a time
from a buffered stream); the EHLO hook adds the keyword.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from dispatcher.errors import ConfigurationError

log = structlog.get_logger(__name__)

#: Recorded in ``commands`` in place of a line longer than aiosmtpd's limit (it answers 500 and discards it).
OVERLONG_LINE = "<overlong line discarded>"


@dataclass(frozen=True)
class Rule:
    """Answer RCPT for one recipient with ``code text`` the first ``times`` times (None = always)."""

    code: int
    text: str
    times: int | None = None


@dataclass(frozen=True)
class ReceivedMessage:
    """One accepted message. ``data`` is exactly what arrived after DATA: un-dot-stuffed, CRLF endings."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    connection_id: int
    received_at: float
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    path: Path | None = None


_DEFAULT_RULE_TEXT = {
    4: "4.2.0 Temporarily unavailable (devsink rule)",
    5: "5.1.1 Mailbox unavailable (devsink rule)",
}


def parse_rule(spec: str) -> tuple[str, Rule]:
    """Parse ``ADDRESS=CODE[:TIMES]`` where TIMES is ``once``, ``always`` or a positive integer.

    Examples: ``soft@example.com=450:once``, ``hard@example.com=550``, ``x@y=451:3``. The address is
    returned lower-cased (rules match case-insensitively).
    """
    address, sep, answer = spec.partition("=")
    address = address.strip()
    if not sep or not address or "@" not in address:
        raise ConfigurationError(
            f"rule {spec!r}: expected ADDRESS=CODE[:TIMES], e.g. soft@example.com=450:once"
        )
    code_text, _, times_text = answer.partition(":")
    try:
        code = int(code_text)
    except ValueError:
        raise ConfigurationError(f"rule {spec!r}: code {code_text!r} is not a number") from None
    if not 400 <= code <= 599:
        raise ConfigurationError(f"rule {spec!r}: code {code} must be a 4xx or 5xx refusal")
    times: int | None
    if times_text in ("", "always"):
        times = None
    elif times_text == "once":
        times = 1
    else:
        try:
            times = int(times_text)
        except ValueError:
            raise ConfigurationError(
                f"rule {spec!r}: times {times_text!r} must be 'once', 'always' or a positive integer"
            ) from None
        if times < 1:
            raise ConfigurationError(f"rule {spec!r}: times must be at least 1, got {times}")
    return address.lower(), Rule(code=code, text=_DEFAULT_RULE_TEXT[code // 100], times=times)


class _RecordingSMTP(SMTP):
    """aiosmtpd's protocol plus a connection id and a tap on the command-line reader."""

    def __init__(self, sink: DevSink, handler: _SinkHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._sink = sink
        self.connection_id = 0
        self._counted = False
        self._overrun = False  # the line being read was too long; record OVERLONG_LINE for it
        self._in_data = False  # message lines are not commands
        self._in_auth = False  # neither are AUTH continuation lines (credentials)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Called again by the TLS layer after STARTTLS: that is the same connection.
        if self._original_transport is None and not self._counted:
            self._counted = True
            self.connection_id = self._sink._connection_opened(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        # aiosmtpd may call this twice (failed TLS setup); count the close once.
        if self._counted:
            self._counted = False
            self._sink._connection_closed(self)
        super().connection_lost(error)

    def _cb_client_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super()._cb_client_connected(reader, writer)
        read_line = reader.readuntil

        # _handle_client reads each command with readuntil() (separator b"\n"); DATA reads lines with
        # readuntil(b"\r\n") and AUTH challenges with readline(), which calls readuntil(b"\n") too. The
        # flags set by smtp_DATA / smtp_AUTH below keep message lines and credentials out of `commands`.
        async def recording_readuntil(separator: bytes = b"\n") -> bytes:
            try:
                line = await read_line(separator)
            except asyncio.LimitOverrunError:
                self._overrun = True
                raise
            if not self._in_data and not self._in_auth:
                text = line.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
                if self._overrun:
                    text = OVERLONG_LINE
                self._overrun = False
                self._sink._command_received(self.connection_id, text)
            return line

        reader.readuntil = recording_readuntil  # type: ignore[assignment,method-assign]

    async def smtp_DATA(self, arg: str) -> None:
        self._in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self._in_data = False

    async def smtp_AUTH(self, arg: str) -> None:
        self._in_auth = True
        try:
            await super().smtp_AUTH(arg)
        finally:
            self._in_auth = False


class _SinkHandler:
    """aiosmtpd handler hooks: EHLO keywords, RCPT rules, message recording."""

    def __init__(self, sink: DevSink) -> None:
        self._sink = sink

    async def handle_EHLO(
        self,
        server: _RecordingSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # aiosmtpd leaves this to the hook when one is installed
        return self._sink._ehlo_responses(responses)

    async def handle_RCPT(
        self, server: _RecordingSMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        refusal = self._sink._rule_answer(address)
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: _RecordingSMTP, session: Session, envelope: Envelope) -> str:
        message = self._sink._store(server.connection_id, envelope)
        return f"250 2.0.0 OK stored {len(message.data)} bytes"


class DevSink:
    """A local SMTP server that accepts everything (unless a rule says otherwise) and records it.

    ``port=0`` picks a free port; the real one is ``.port`` after ``start()``. All recorded state is
    thread-safe; the list properties return snapshots.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        maildir: Path | None = None,
        rules: Mapping[str, Rule] | None = None,
        pipelining: bool = True,
        starttls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth_users: Mapping[str, str] | None = None,
        smtputf8: bool = True,
    ) -> None:
        self.host = host
        self.port = port
        self.maildir = Path(maildir) if maildir is not None else None
        self._rules = {address.lower(): rule for address, rule in (rules or {}).items()}
        self._rule_hits: dict[str, int] = {}
        self._pipelining = pipelining
        self._tls = starttls_context
        self._require_starttls = require_starttls
        self._auth_users = dict(auth_users) if auth_users is not None else None
        self._smtputf8 = smtputf8
        self._cond = threading.Condition()
        self._messages: list[ReceivedMessage] = []
        self._commands: list[tuple[int, str]] = []
        self._open: set[_RecordingSMTP] = set()
        self.connections = 0
        self.active_connections = 0
        self.max_active_connections = 0
        self.ehlo_count = 0
        self._sequence = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        """Bind and serve in a background thread; returns once the socket listens."""
        if self._thread is not None:
            raise RuntimeError("DevSink already started")
        if self.maildir is not None:
            self.maildir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            self._server = loop.run_until_complete(
                loop.create_server(self._make_protocol, self.host, self.port)
            )
        except BaseException:
            loop.close()
            self._loop = None
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        self._thread = threading.Thread(target=loop.run_forever, name=f"devsink-{self.port}", daemon=True)
        self._thread.start()
        log.info("devsink_started", host=self.host, port=self.port, maildir=str(self.maildir or ""))

    def stop(self) -> None:
        """Close the listener and every open connection, then end the loop thread. Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()
        self._loop = self._thread = self._server = None

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for protocol in list(self._open):
            if protocol.transport is not None:
                protocol.transport.close()
            original = protocol._original_transport
            if isinstance(original, asyncio.Transport):
                original.abort()
        await self._server.wait_closed()
        current = asyncio.current_task()
        tasks = [task for task in asyncio.all_tasks() if task is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> DevSink:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _make_protocol(self) -> _RecordingSMTP:
        auth = self._auth_users is not None
        return _RecordingSMTP(
            self,
            _SinkHandler(self),
            hostname="devsink.localhost",
            enable_SMTPUTF8=self._smtputf8,
            tls_context=self._tls,
            require_starttls=self._require_starttls,
            auth_require_tls=not auth,  # loopback testing: AUTH without TLS is allowed when users are given
            authenticator=self._authenticate if auth else None,
            auth_exclude_mechanism=None if auth else ["PLAIN", "LOGIN"],
            loop=self._loop,
        )

    # --- recorded state --------------------------------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._cond:
            return list(self._messages)

    @property
    def commands(self) -> list[tuple[int, str]]:
        """(connection id, command line without CRLF) for every command line received, in order."""
        with self._cond:
            return list(self._commands)

    def command_lines(self, connection_id: int | None = None) -> list[str]:
        """Just the command lines, optionally of one connection."""
        return [line for cid, line in self.commands if connection_id is None or cid == connection_id]

    def wait_for_messages(self, count: int, timeout: float) -> list[ReceivedMessage]:
        """Block until at least ``count`` messages arrived; TimeoutError says what did arrive."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout=timeout):
                seen = [(m.mail_from, m.rcpt_tos, len(m.data)) for m in self._messages]
                raise TimeoutError(
                    f"expected {count} message(s) within {timeout}s, got {len(seen)}: {seen}; "
                    f"last commands: {self._commands[-10:]}"
                )
            return list(self._messages)

    # --- called from the loop thread -------------------------------------------------------------------

    def _connection_opened(self, protocol: _RecordingSMTP) -> int:
        with self._cond:
            self._open.add(protocol)
            self.connections += 1
            self.active_connections += 1
            self.max_active_connections = max(self.max_active_connections, self.active_connections)
            self._cond.notify_all()
            return self.connections

    def _connection_closed(self, protocol: _RecordingSMTP) -> None:
        with self._cond:
            self._open.discard(protocol)
            self.active_connections -= 1
            self._cond.notify_all()

    def _command_received(self, connection_id: int, line: str) -> None:
        with self._cond:
            self._commands.append((connection_id, line))
            self._cond.notify_all()

    def _ehlo_responses(self, responses: list[str]) -> list[str]:
        with self._cond:
            self.ehlo_count += 1
        if self._auth_users is None:
            responses = [line for line in responses if not line[4:].startswith("AUTH")]
        if self._pipelining:
            responses.insert(1, "250-PIPELINING")
        return responses

    def _rule_answer(self, address: str) -> str | None:
        key = address.lower()
        rule = self._rules.get(key)
        if rule is None:
            return None
        with self._cond:
            hits = self._rule_hits.get(key, 0)
            if rule.times is not None and hits >= rule.times:
                return None
            self._rule_hits[key] = hits + 1
        return f"{rule.code} {rule.text}"

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        users = self._auth_users or {}
        if isinstance(auth_data, LoginPassword):
            login = auth_data.login.decode("utf-8", "replace")
            if users.get(login) == auth_data.password.decode("utf-8", "replace"):
                return AuthResult(success=True, auth_data=login)
        return AuthResult(success=False, handled=False)

    def _store(self, connection_id: int, envelope: Envelope) -> ReceivedMessage:
        data: bytes = envelope.original_content or b""
        mail_from: str = envelope.mail_from or ""
        rcpt_tos: list[str] = list(envelope.rcpt_tos)
        with self._cond:
            self._sequence += 1
            sequence = self._sequence
        path = self._write_eml(sequence, mail_from, rcpt_tos, data) if self.maildir is not None else None
        message = ReceivedMessage(
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            data=data,
            connection_id=connection_id,
            received_at=time.time(),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            path=path,
        )
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()
        log.info(
            "devsink_message_stored",
            connection_id=connection_id,
            **{"from": mail_from},
            to=rcpt_tos,
            size=len(data),
            path=str(path) if path else None,
        )
        return message

    def _write_eml(self, sequence: int, mail_from: str, rcpt_tos: Sequence[str], data: bytes) -> Path:
        """Write atomically under a name that sorts by arrival: <epoch ms>-<pid>-<sequence>.eml."""
        assert self.maildir is not None
        envelope_headers = f"Return-Path: <{mail_from}>\r\n"
        envelope_headers += "".join(f"X-Original-To: {rcpt}\r\n" for rcpt in rcpt_tos)
        name = f"{time.time_ns() // 1_000_000:013d}-{os.getpid()}-{sequence:06d}.eml"
        final = self.maildir / name
        partial = self.maildir / f".{name}.tmp"
        partial.write_bytes(envelope_headers.encode("utf-8", "surrogateescape") + data)
        os.replace(partial, final)
        return final
