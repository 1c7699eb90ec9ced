"""``SmtpClient``: one reusable SMTP connection with an explicit lifecycle.

NEW → READY (greeted, EHLO'd, TLS and AUTH done) → IN_TRANSACTION → READY … → CLOSED (QUIT sent).
A READY connection is checked before reuse: past its message or age cap it is closed with QUIT; if the
server hung up or wrote while idle it is dropped; after ``idle_probe`` seconds idle it must answer NOOP.
A 421 or a dead connection before MAIL FROM was accepted costs the message nothing: the client
reconnects once and goes on. After a failed transaction it sends RSET, ignores RSET's own failure and
keeps the original outcome (the habit of aiosmtplib's ``sendmail``).
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

from dispatcher.errors import (
    ConnectionLost,
    PolicyError,
    ReplyError,
    ServiceClosing,
    SmtpError,
)
from dispatcher.smtp import commands
from dispatcher.smtp.auth import AuthExchange, choose_mechanism
from dispatcher.smtp.config import SmtpConfig, TlsMode, parse_smtp_url
from dispatcher.smtp.connection import Connection
from dispatcher.smtp.extensions import Extensions, parse_ehlo
from dispatcher.smtp.outcomes import SendResult
from dispatcher.smtp.protocol import Transaction, error_after_break
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage
from dispatcher.smtp.stream import MessageStream, Outgoing
from dispatcher.smtp.transcript import Transcript

FREE_RECONNECTS = 1
_HELO_FALLBACK_CODES = frozenset({500, 502})
_connection_numbers = itertools.count(1)


class SessionState(enum.Enum):
    NEW = "new"
    READY = "ready"
    IN_TRANSACTION = "in_transaction"
    CLOSED = "closed"


class SmtpClient:
    """Send mail over one kept SMTP connection; see the module docstring for its lifecycle."""

    def __init__(self, config: SmtpConfig) -> None:
        self.config = config
        self.state = SessionState.NEW
        self.extensions = Extensions.none()
        self.messages_on_connection = 0
        self.connections_opened = 0
        self.conn_id = ""
        self.data_in_flight = False
        self._conn: Connection | None = None
        self._opened_at = 0.0
        self._last_used = 0.0
        self._transcript = Transcript("")
        self._stream: MessageStream | None = None
        self._host_tag = uuid.uuid4().hex[:6]

    @classmethod
    def from_url(cls, url: str) -> SmtpClient:
        return cls(parse_smtp_url(url))

    def __repr__(self) -> str:
        return (
            f"<SmtpClient {self.config.redacted_url()} state={self.state.value} conn_id={self.conn_id or '-'}"
            f" messages={self.messages_on_connection}>"
        )

    def __enter__(self) -> SmtpClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def tls_version(self) -> str | None:
        return self._conn.tls_version if self._conn else None

    @property
    def last_transcript(self) -> tuple[dict[str, object], ...]:
        """The redacted commands and replies of the latest ``send`` (or connection attempt)."""
        return tuple(self._transcript.entries)

    # -- public operations -------------------------------------------------------------------------

    def send(self, sender: str, recipients: Sequence[str], data: bytes) -> SendResult:
        """Send one message; every reply-decided outcome comes back per recipient in the result.

        Raises ``SmtpError`` subclasses for what is not one recipient's outcome: the route (connect, TLS,
        AUTH, 421, drops, timeouts), a local policy refusal (SIZE, SMTPUTF8, 8BITMIME) before anything is
        sent, and ``UnknownOutcome`` when the data went out but no reply to it came back.
        """
        _check_envelope(sender, recipients)  # refuse bad arguments before connecting
        self._transcript.begin()
        reconnects = 0
        while True:
            self.connect()
            tx = self._transaction(sender, recipients, data)
            try:
                return self._run(tx)
            except (ConnectionLost, ServiceClosing) as exc:
                if tx.envelope_accepted or reconnects >= FREE_RECONNECTS:
                    raise
                reconnects += 1
                self._transcript.event("smtp_reconnect", reason=str(exc), stage=_stage_name(exc))

    def send_stream(
        self, source: Iterator[Outgoing], may_follow: Callable[[], bool] | None = None
    ) -> Iterator[tuple[Outgoing, SendResult | SmtpError]]:
        """Send what ``source`` yields back to back on one connection, one round trip per message where the
        server allows it (``dispatcher.smtp.stream``); each message comes back with its result or error, in
        order. It ends when ``source`` does, at the connection's message cap, or when the connection breaks:
        call it again to go on with the rest of ``source``."""
        self._transcript.begin()
        self._stream = None
        try:
            self.connect()
        except SmtpError as exc:
            message = next(source, None)
            if message is not None:
                yield message, exc
            return
        if not (self.config.pipelining and self.extensions.pipelining):
            for message in source:  # lock-step server: plain sends, one after the other
                try:
                    yield message, self.send(message.sender, message.recipients, message.data)
                except SmtpError as exc:
                    yield message, exc
                if self.state is not SessionState.READY:
                    return
            return
        self._stream = MessageStream(self, source, may_follow)
        self.state = SessionState.IN_TRANSACTION
        try:
            yield from self._stream.run()
        finally:
            if self._conn is not None and self.state is SessionState.IN_TRANSACTION:
                self.state = SessionState.READY

    def stream_in_flight(self) -> list[tuple[Outgoing, bool]]:
        """After an interruption: the messages of the last stream that were on the wire, each with whether
        all of its data had been written (those may have been accepted)."""
        return self._stream.in_flight() if self._stream is not None else []

    def connect(self) -> None:
        """Make the connection READY: reuse the current one if it is healthy, else open a new one."""
        if self._conn is not None and self.state is SessionState.READY:
            self._check_reusable()
        if self._conn is None or self.state is not SessionState.READY:
            self._open()

    def noop(self) -> Reply:
        self.connect()
        return self._command(Stage.NOOP, commands.noop(), {250})

    def close(self) -> None:
        """QUIT politely (errors ignored) and close the socket."""
        if self._conn is not None and self.state is SessionState.READY:
            with contextlib.suppress(SmtpError):
                self._command(Stage.QUIT, commands.quit(), {221})
        self._discard(SessionState.CLOSED)

    def abort(self) -> None:
        """Close without QUIT: for a connection in an unknown state (interrupted mid-transaction)."""
        self._discard(SessionState.CLOSED)

    # -- lifecycle ---------------------------------------------------------------------------------

    def _check_reusable(self) -> None:
        assert self._conn is not None
        now = time.monotonic()
        if (
            self.messages_on_connection >= self.config.max_messages
            or now - self._opened_at >= self.config.max_age
        ):
            self._transcript.event(
                "smtp_connection_retired",
                messages=self.messages_on_connection,
                age_s=round(now - self._opened_at, 1),
            )
            self.close()
        elif self._conn.has_unread_input():
            self._transcript.event("smtp_connection_stale", reason="server wrote or hung up while idle")
            self._discard(SessionState.CLOSED)
        elif now - self._last_used >= self.config.idle_probe:
            try:
                self._command(Stage.NOOP, commands.noop(), {250})
            except SmtpError as exc:
                self._transcript.event("smtp_connection_stale", reason=str(exc))
                self._discard(SessionState.CLOSED)

    def _open(self) -> None:
        self._discard(SessionState.NEW)
        self.conn_id = f"{self._host_tag}-{os.getpid()}-{next(_connection_numbers)}"
        self._transcript.conn_id = self.conn_id
        self._transcript.tls_version = None
        config = self.config
        self._conn = Connection.open(config, implicit_tls=config.tls is TlsMode.IMPLICIT)
        self.connections_opened += 1
        self._opened_at = self._last_used = time.monotonic()
        self.messages_on_connection = 0
        try:
            self._transcript.tls_version = self._conn.tls_version
            self._transcript.event(
                "smtp_connected", host=config.host, port=config.port, tls=self._transcript.tls_version
            )
            self._expect_reply(Stage.GREETING, {220})
            self.extensions = self._hello()
            self._negotiate_tls()
            self._authenticate()
        except BaseException:
            self._discard(SessionState.CLOSED)
            raise
        self.state = SessionState.READY

    def _hello(self) -> Extensions:
        name = self.config.ehlo_name
        reply = self._command(Stage.EHLO, commands.ehlo(name), None)
        if reply.code == 250:
            return parse_ehlo(reply)
        if reply.code not in _HELO_FALLBACK_CODES:
            raise ReplyError("EHLO refused", stage=Stage.EHLO, reply=reply)
        helo = self._command(Stage.HELO, commands.helo(name), {250})
        return Extensions.none(helo.text)

    def _negotiate_tls(self) -> None:
        assert self._conn is not None
        mode = self.config.tls
        if mode in (TlsMode.OFF, TlsMode.IMPLICIT):
            return
        if not self.extensions.starttls:
            if mode is TlsMode.REQUIRED:
                raise PolicyError(
                    "the route requires TLS but the server does not offer STARTTLS",
                    stage=Stage.STARTTLS,
                    route_level=True,
                )
            self._transcript.event("smtp_tls_unavailable", reason="STARTTLS not offered")
            return
        reply = self._command(Stage.STARTTLS, commands.starttls(), None)
        if reply.code != 220:
            if mode is TlsMode.REQUIRED:
                raise ReplyError("STARTTLS refused", stage=Stage.STARTTLS, reply=reply)
            self._transcript.event("smtp_tls_unavailable", reason=reply.summary())
            return
        self._conn.start_tls()
        # RFC 3207 §4.2: forget everything learnt before TLS and ask again.
        self.extensions = Extensions.none()
        self._transcript.tls_version = self._conn.tls_version
        self._transcript.event("smtp_tls_established", tls=self._conn.tls_version)
        self.extensions = self._hello()

    def _authenticate(self) -> None:
        assert self._conn is not None
        credentials = self.config.credentials
        if credentials is None:
            return
        if not self._conn.is_tls and not self.config.allow_plaintext_auth:
            raise PolicyError(
                "refusing to send credentials over a plaintext connection "
                "(set allow_plaintext_auth=true to permit it)",
                stage=Stage.AUTH,
                route_level=True,
            )
        exchange = AuthExchange(choose_mechanism(self.extensions.auth_mechanisms, credentials), credentials)
        line: bytes | None = exchange.start()
        while line is not None:
            self._transcript.command(Stage.AUTH, exchange.redacted(line))
            self._conn.send(line, Stage.AUTH)
            reply = self._read(Stage.AUTH)
            line = exchange.receive(reply)

    def _discard(self, state: SessionState) -> None:
        if self._conn is not None:
            self._conn.close()
            self._transcript.event("smtp_closed", messages=self.messages_on_connection)
        self._conn = None
        self.state = state

    # -- the transaction ---------------------------------------------------------------------------

    def _run(self, tx: Transaction) -> SendResult:
        assert self._conn is not None
        self.state = SessionState.IN_TRANSACTION
        round_trips = 0
        try:
            while (step := tx.next_step()) is not None:
                self._write(step.payload, step.lines, data_size=step.data_size if step.is_data else 0)
                if step.is_data:
                    tx.data_written()
                round_trips += 1
                for stage in step.expect:
                    tx.receive(stage, self._read(stage))
        except SmtpError as exc:
            self.data_in_flight = False
            self._discard(SessionState.CLOSED)
            raise error_after_break(tx, exc) from exc
        self.data_in_flight = False
        self.messages_on_connection += 1
        self._last_used = time.monotonic()
        self.state = SessionState.READY
        if tx.needs_rset:
            self._rset()
        return SendResult(
            tx.outcomes(), tx.deciding_reply(), self.conn_id, tuple(self._transcript.entries), round_trips
        )

    # -- used by the stream ----------------------------------------------------------------------------

    def _transaction(self, sender: str, recipients: Sequence[str], data: bytes) -> Transaction:
        """A transaction for the current extensions; bad arguments and local refusals raise here."""
        targets = _check_envelope(sender, recipients)
        return Transaction(
            sender, targets, data, self.extensions, self.config.pipelining, self.config.chunking
        )

    def _write(self, payload: bytes, lines: Sequence[tuple[Stage, str]], *, data_size: int) -> None:
        self._log(lines, data_size=data_size)
        self._send_raw(payload, data_size=data_size, stage=lines[0][0] if lines else Stage.MAIL)

    def _log(self, lines: Sequence[tuple[Stage, str]], *, data_size: int = 0) -> None:
        for stage, line in lines:
            self._transcript.command(stage, line)
        if data_size:
            self._transcript.data(Stage.DATA_BLOCK, data_size)

    def _send_raw(self, payload: bytes, *, data_size: int, stage: Stage) -> None:
        """Message data goes block by block under the data-block deadline; commands under ``stage``'s."""
        assert self._conn is not None
        if data_size:
            self.data_in_flight = True
            self._conn.send_data(payload)
        else:
            self._conn.send(payload, stage)
        self._last_used = time.monotonic()

    def _finish_transaction(self, tx: Transaction) -> SendResult:
        self.data_in_flight = False
        self.messages_on_connection += 1
        self._last_used = time.monotonic()
        return SendResult(
            tx.outcomes(), tx.deciding_reply(), self.conn_id, tuple(self._transcript.entries), 1
        )

    def _discard_broken(self) -> None:
        self.data_in_flight = False
        self._discard(SessionState.CLOSED)

    def _rset(self) -> None:
        try:
            self._command(Stage.RSET, commands.rset(), {250})
        except SmtpError as exc:
            self._transcript.event("smtp_rset_failed", reason=str(exc))
            self._discard(SessionState.CLOSED)

    # -- one command, one reply --------------------------------------------------------------------

    def _read(self, stage: Stage) -> Reply:
        """Read one reply; a 421 on any command means the server is closing (RFC 5321 §3.8)."""
        assert self._conn is not None
        reply = self._conn.read_reply(stage)
        self._transcript.reply(stage, reply)
        if reply.code == 421:
            raise ServiceClosing("the server is closing the connection", stage=stage, reply=reply)
        return reply

    def _expect_reply(self, stage: Stage, ok: set[int] | None) -> Reply:
        reply = self._read(stage)
        if ok is not None and reply.code not in ok:
            raise ReplyError(f"unexpected reply to {stage.value}", stage=stage, reply=reply)
        return reply

    def _command(self, stage: Stage, line: bytes, ok: set[int] | None) -> Reply:
        assert self._conn is not None
        self._transcript.command(stage, line.decode("utf-8").rstrip("\r\n"))
        self._conn.send(line, stage)
        self._last_used = time.monotonic()
        return self._expect_reply(stage, ok)


def _check_envelope(sender: str, recipients: Sequence[str]) -> tuple[str, ...]:
    commands.check_address(sender, "sender")
    targets = tuple(commands.check_address(r, "recipient") for r in recipients)
    if not targets:
        raise PolicyError("no recipients given", stage=Stage.RCPT)
    return targets


def _stage_name(exc: SmtpError) -> str | None:
    return exc.stage.value if exc.stage else None
