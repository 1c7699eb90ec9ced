"""``SmtpClient``: one reusable SMTP connection with an explicit lifecycle.

NEW → READY (greeted, EHLO'd, TLS and AUTH done) → IN_TRANSACTION → READY … → CLOSED (QUIT sent).
A READY connection is checked before reuse: past its message or age cap it is closed with QUIT; if the
server hung up or wrote while idle it is dropped; after ``idle_probe`` seconds idle it must answer NOOP.
A 421 or a dead connection before MAIL FROM was accepted costs the message nothing: the client
reconnects once and goes on. After a failed transaction it sends RSET, ignores RSET's own failure and
keeps the original outcome (the habit of aiosmtplib's ``sendmail``).

The client owns the lifecycle; the I/O of the open connection is its ``Channel`` (``channel``), which the
one-message driver here and the back-to-back driver (``stream``) both use.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import itertools
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType

from dispatcher.errors import (
    ConnectionLost,
    ServiceClosing,
    SmtpError,
)
from dispatcher.smtp import commands
from dispatcher.smtp.channel import Channel, check_envelope
from dispatcher.smtp.config import SmtpConfig, TlsMode, parse_smtp_url
from dispatcher.smtp.connection import Connection
from dispatcher.smtp.envelopes import MAX_RCPT_PER_TRANSACTION, EnvelopePlan, wants_next_transaction
from dispatcher.smtp.extensions import Extensions
from dispatcher.smtp.handshake import open_session
from dispatcher.smtp.outcomes import SendResult
from dispatcher.smtp.permit import ConnectionPermit
from dispatcher.smtp.protocol import Transaction, error_after_break
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage
from dispatcher.smtp.stream import MessageStream, Outgoing
from dispatcher.smtp.transcript import Transcript

FREE_RECONNECTS = 1
_connection_numbers = itertools.count(1)


class SessionState(enum.Enum):
    NEW = "new"
    READY = "ready"
    IN_TRANSACTION = "in_transaction"
    CLOSED = "closed"


class SmtpClient:
    """Send mail over one kept SMTP connection; see the module docstring for its lifecycle."""

    def __init__(self, config: SmtpConfig, *, permit: ConnectionPermit | None = None) -> None:
        self.config = config
        self.permit = permit
        self.state = SessionState.NEW
        self.extensions = Extensions.none()
        self.connections_opened = 0
        self.conn_id = ""
        self._channel: Channel | None = None
        self._transcript = Transcript("")
        self._stream: MessageStream | None = None
        self._alone: Outgoing | None = None
        """A stream's message with more recipients than one transaction takes, while ``send`` sends it."""
        self._data_out_earlier = False
        """An earlier transaction of the current ``send`` wrote its data (a message in several)."""
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
        return self._channel.conn.tls_version if self._channel else None

    @property
    def messages_on_connection(self) -> int:
        return self._channel.messages if self._channel else 0

    @property
    def data_in_flight(self) -> bool:
        """Message data is being written — or, for a message in several transactions, was by an earlier
        one: interrupted now, the message may have been delivered."""
        return self._data_out_earlier or (self._channel.data_in_flight if self._channel else False)

    def take_replies(self) -> tuple[Reply, ...]:
        """Every refusal or 421 this client read since the last call — including those it recovered from
        (a 421 before MAIL answered by its free reconnect): what a route's limiter and breaker must see."""
        return self._transcript.take_replies()

    @property
    def last_transcript(self) -> tuple[dict[str, object], ...]:
        """The redacted commands and replies of the latest ``send`` (or connection attempt)."""
        return tuple(self._transcript.entries)

    def transcript_of(self, key: str) -> tuple[dict[str, object], ...]:
        """A streamed message's own transcript: the connection's lines and its transaction's, none of the
        other messages' of the stream (``last_transcript`` for a key the latest stream did not carry)."""
        return self._transcript.for_message(key)

    # -- public operations -------------------------------------------------------------------------

    def send(
        self,
        sender: str,
        recipients: Sequence[str],
        data: bytes,
        *,
        before_data: Callable[[], None] | None = None,
    ) -> SendResult:
        """Send one message; every reply-decided outcome comes back per recipient in the result.

        Raises ``SmtpError`` subclasses for what is not one recipient's outcome: the route (connect, TLS,
        AUTH, 421, drops, timeouts), a local policy refusal (SIZE, SMTPUTF8, 8BITMIME) before anything is
        sent, and ``UnknownOutcome`` when the data went out but no reply to it came back.

        ``before_data`` is called right before the write that carries the message's data (from then on
        the message may be delivered): a queue makes that durable there. If it raises, no data is sent.

        More than ``MAX_RCPT_PER_TRANSACTION`` (100) recipients, or a 452 "too many recipients" to some,
        and the message goes in several transactions one after the other (``dispatcher.smtp.envelopes``;
        RFC 5321 §4.5.3.1.8 and §4.5.3.1.10), ``before_data`` before each one's data. An error once a
        transaction has ended is no longer raised: it becomes the outcome of the recipients it left.
        """
        check_envelope(sender, recipients)  # refuse bad arguments before connecting
        self._transcript.begin()
        return self._send_plan(EnvelopePlan(recipients), sender, data, before_data)

    def _send_plan(
        self, plan: EnvelopePlan, sender: str, data: bytes, before_data: Callable[[], None] | None
    ) -> SendResult:
        """The transactions ``plan`` still holds, one after the other; see ``send``."""
        wrote: list[bool] = [True] if plan.started else []

        def data_goes_out() -> None:
            wrote.append(True)
            if before_data is not None:
                before_data()

        self._data_out_earlier = bool(wrote)  # left set when an interruption (not an SmtpError) breaks out
        while (batch := plan.next_batch()) is not None:
            if plan.started:
                self._transcript.event("smtp_next_transaction", recipients=len(batch))
            try:
                plan.settle(self._transaction(sender, batch, data, data_goes_out))
            except SmtpError as exc:
                if not plan.started:
                    raise
                plan.broke(exc, batch)
            self._data_out_earlier = bool(wrote)
        self._data_out_earlier = False
        return plan.result()

    def _transaction(
        self, sender: str, recipients: Sequence[str], data: bytes, before_data: Callable[[], None] | None
    ) -> SendResult:
        """One transaction; a 421 or a drop before MAIL was answered costs it one reconnect."""
        reconnects = 0
        while True:
            channel = self._ready()
            tx = channel.transaction(sender, recipients, data)
            try:
                return self._run(channel, tx, before_data)
            except (ConnectionLost, ServiceClosing) as exc:
                if tx.envelope_accepted or reconnects >= FREE_RECONNECTS:
                    raise
                reconnects += 1
                self._transcript.event("smtp_reconnect", reason=str(exc), stage=_stage_name(exc))

    def send_stream(
        self,
        source: Iterator[Outgoing],
        may_follow: Callable[[], bool] | None = None,
        *,
        before_data: Callable[[Outgoing], None] | None = None,
    ) -> Iterator[tuple[Outgoing, SendResult | SmtpError]]:
        """Send what ``source`` yields back to back on one connection, one round trip per message where the
        server allows it (``dispatcher.smtp.stream``); each message comes back with its result or error, in
        order. It ends when ``source`` does, at the connection's message cap, or when the connection breaks:
        call it again to go on with the rest of ``source``. ``before_data`` as for ``send``, per message.

        A message with more recipients than one transaction takes ends the stream and goes alone
        (``send``); one whose transaction answered 452 to some recipients (and accepted others) comes back
        after the stream, once those went in the next transaction."""
        self._transcript.begin()
        self._stream = None
        self._alone = None
        try:
            channel = self._ready()
        except SmtpError as exc:
            message = next(source, None)
            if message is not None:
                yield message, exc
            return
        if not (self.config.pipelining and self.extensions.pipelining):
            for message in source:  # lock-step server: plain sends, one after the other
                hook = functools.partial(before_data, message) if before_data is not None else None
                try:
                    result = self.send(message.sender, message.recipients, message.data, before_data=hook)
                    yield message, result
                except SmtpError as exc:
                    yield message, exc
                if self.state is not SessionState.READY:
                    return
            return
        large: list[Outgoing] = []  # a message for several transactions ends the stream and goes alone
        more: list[tuple[Outgoing, SendResult]] = []  # answered 452 to some: they go once the stream ends
        self._stream = MessageStream(
            channel, _until_large(source, large), may_follow, on_break=self.abort, before_data=before_data
        )
        self.state = SessionState.IN_TRANSACTION
        try:
            for message, streamed in self._stream.run():
                if isinstance(streamed, SendResult) and wants_next_transaction(streamed):
                    more.append((message, streamed))
                else:
                    yield message, streamed
        finally:
            if self._channel is not None and self.state is SessionState.IN_TRANSACTION:
                self.state = SessionState.READY
        for message, first in more:
            hook = functools.partial(before_data, message) if before_data is not None else None
            plan = EnvelopePlan(message.recipients)
            plan.next_batch()  # what the stream sent: all of them (never more than one transaction takes)
            plan.settle(first)
            self._alone = message  # left set when an interruption breaks out: ``stream_in_flight`` tells
            self._transcript.event("smtp_next_transaction", recipients=len(plan.todo))
            result = self._send_plan(plan, message.sender, message.data, hook)  # raises no SmtpError
            self._alone = None
            yield message, result
        for message in large:
            hook = functools.partial(before_data, message) if before_data is not None else None
            self._alone = message  # left set when an interruption breaks out: ``stream_in_flight`` tells
            try:
                outcome: SendResult | SmtpError = self.send(
                    message.sender, message.recipients, message.data, before_data=hook
                )
            except SmtpError as exc:
                outcome = exc
            self._alone = None
            yield message, outcome
            if self.state is SessionState.READY:
                yield from self.send_stream(source, may_follow, before_data=before_data)

    def stream_in_flight(self) -> list[tuple[Outgoing, bool]]:
        """After an interruption: the messages of the last stream that were on the wire, each with whether
        all of its data had been written (those may have been accepted)."""
        if self._alone is not None:
            return [(self._alone, self.data_in_flight)]
        return self._stream.in_flight() if self._stream is not None else []

    def connect(self) -> None:
        """Make the connection READY: reuse the current one if it is healthy, else open a new one."""
        self._ready()

    def noop(self) -> Reply:
        return self._ready().command(Stage.NOOP, commands.noop(), {250})

    def close(self) -> None:
        """QUIT politely (errors ignored) and close the socket."""
        if self._channel is not None and self.state is SessionState.READY:
            with contextlib.suppress(SmtpError):
                self._channel.command(Stage.QUIT, commands.quit(), {221})
        self._discard(SessionState.CLOSED)

    def abort(self) -> None:
        """Close without QUIT: for a connection in an unknown state (interrupted mid-transaction)."""
        self._discard(SessionState.CLOSED)

    def interrupt(self) -> None:
        """From another thread: break the open connection; the thread using it sees it lost and drops it."""
        if (channel := self._channel) is not None:
            channel.conn.interrupt()

    # -- lifecycle ---------------------------------------------------------------------------------

    def _ready(self) -> Channel:
        """The channel of a READY connection: the current one if it is healthy, else a new one."""
        if self._channel is not None and self.state is SessionState.READY:
            self._check_reusable(self._channel)
        if self._channel is None or self.state is not SessionState.READY:
            self._open()
        assert self._channel is not None
        return self._channel

    def _check_reusable(self, channel: Channel) -> None:
        now = time.monotonic()
        refused = channel.mail_refused
        age = now - channel.opened_at
        capped = channel.messages >= self.config.max_messages or age >= self.config.max_age
        if refused is not None or capped:
            why = {"reason": f"MAIL refused: {refused.code} {refused.text}"} if refused is not None else {}
            self._transcript.event(
                "smtp_connection_retired",
                messages=channel.messages,
                age_s=round(age, 1),
                **why,
            )
            self.close()
        elif channel.conn.has_unread_input():
            self._transcript.event("smtp_connection_stale", reason="server wrote or hung up while idle")
            self._discard(SessionState.CLOSED)
        elif now - channel.last_used >= self.config.idle_probe:
            try:
                channel.command(Stage.NOOP, commands.noop(), {250})
            except SmtpError as exc:
                self._transcript.event("smtp_connection_stale", reason=str(exc))
                self._discard(SessionState.CLOSED)

    def _open(self) -> None:
        self._discard(SessionState.NEW)
        if self.permit is not None:
            self.permit.acquire()
        self.conn_id = f"{self._host_tag}-{os.getpid()}-{next(_connection_numbers)}"
        self._transcript.conn_id = self.conn_id
        self._transcript.tls_version = None
        config = self.config
        try:
            conn = Connection.open(config, implicit_tls=config.tls is TlsMode.IMPLICIT)
        except SmtpError as exc:
            self._discard(SessionState.CLOSED)  # gives the permit back: no connection holds it
            raise exc.not_offered(route_trouble=True) from exc
        except BaseException:
            self._discard(SessionState.CLOSED)
            raise
        channel = self._channel = Channel(conn, self._transcript, config, self.conn_id)
        self.connections_opened += 1
        try:
            self._transcript.tls_version = conn.tls_version
            self._transcript.event(
                "smtp_connected", host=config.host, port=config.port, tls=self._transcript.tls_version
            )
            open_session(channel, config, self._transcript)
        except SmtpError as exc:  # the route is not usable now: its trouble, never the message's
            self._discard(SessionState.CLOSED)
            raise exc.not_offered(route_trouble=True) from exc
        except BaseException:
            self._discard(SessionState.CLOSED)
            raise
        finally:
            self.extensions = channel.extensions
        self.state = SessionState.READY

    def _discard(self, state: SessionState) -> None:
        if self._channel is not None:
            self._channel.conn.close()
            self._transcript.event("smtp_closed", messages=self._channel.messages)
        self._channel = None
        self.state = state
        if state is SessionState.CLOSED and self.permit is not None:
            self.permit.release()

    # -- the transaction ---------------------------------------------------------------------------

    def _run(
        self, channel: Channel, tx: Transaction, before_data: Callable[[], None] | None = None
    ) -> SendResult:
        """Drive one transaction step by step; a break closes the connection (see ``error_after_break``)."""
        self.state = SessionState.IN_TRANSACTION
        round_trips = 0
        with self._transcript.logged_transaction():
            try:
                while (step := tx.next_step()) is not None:
                    if step.is_data and before_data is not None:
                        before_data()
                    channel.write(step.payload, step.lines, data_size=step.data_size if step.is_data else 0)
                    if step.is_data:
                        tx.data_written()
                    round_trips += 1
                    for stage in step.expect:
                        tx.receive(stage, channel.read(stage))
            except SmtpError as exc:
                self._discard(SessionState.CLOSED)
                raise error_after_break(tx, exc) from exc
            channel.ended()
            self.state = SessionState.READY
            if tx.needs_rset and not channel.rset():
                self._discard(SessionState.CLOSED)
        return channel.result(tx, round_trips)


def _until_large(source: Iterator[Outgoing], large: list[Outgoing]) -> Iterator[Outgoing]:
    """``source`` up to the first message with more recipients than one transaction takes: that one is
    put in ``large`` (for ``send``, which splits it) and the stream ends there."""
    for message in source:
        if len(message.recipients) > MAX_RCPT_PER_TRANSACTION:
            large.append(message)
            return
        yield message


def _stage_name(exc: SmtpError) -> str | None:
    return exc.stage.value if exc.stage else None
