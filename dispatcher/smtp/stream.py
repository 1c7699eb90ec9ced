"""Messages back to back on one connection, one round trip each (``SmtpClient.send_stream``).

RFC 2920 §3.1 lets the end of one message's data open the next group, so with PIPELINING the data of
message *n*, its final dot and message *n+1*'s ``RSET``, ``MAIL``, ``RCPT``… and ``DATA`` leave in one
write. With CHUNKING (RFC 3030) nothing has to wait: ``BDAT`` may stand anywhere in a group, so up to
``WINDOW`` whole messages are on the wire before the first one's replies are read. Replies come back in
order and each message gets exactly the outcome ``send`` would give it (the decision table in
``protocol``). ``may_follow`` (optional) says whether the next message may go at once; when it may not (a
rate limit), a message's data goes alone rather than wait for it.

Invariants:
- **A follow-on transaction never inherits state.** Every transaction written while another is open on
  the wire (after its data in the same write, or beside it in the CHUNKING window) starts with ``RSET``:
  pipelinable, no extra round trip, a no-op after an accepted end of data, and the end of a refused one's
  envelope (Exim keeps the envelope of a refused ``BDAT … LAST``: without the RSET the next ``MAIL`` gets
  "503 sender already given" and the message is delivered under the refused one's sender). A message
  refused before its data is followed by RSET in the next group too.
- **A follower refused out of sequence is ours to fix.** When a follower's ``MAIL`` gets 503 and nothing
  of it was accepted (Haraka refuses every command pipelined after the final dot), the server executed
  none of it: it goes again, once, alone, on the same connection, and from then on no envelope crosses a
  final dot or sits beside a whole BDAT message on that server (``quirks.SERVER_QUIRKS``, per host and port
  for the life of the process, logged once as ``smtp_stream_stops_pipelining_after_data``).
- **What cannot be known is never guessed**: when the connection breaks, a message whose data was written
  completely and whose final reply is missing is an ``UnknownOutcome``; the others get the error itself
  (transient) — after a 421 too, since a server closing the channel processes nothing further.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import structlog

from dispatcher.errors import SmtpError
from dispatcher.smtp import commands
from dispatcher.smtp.channel import Channel
from dispatcher.smtp.outcomes import SendResult
from dispatcher.smtp.protocol import Step, Transaction, error_after_break
from dispatcher.smtp.quirks import SERVER_QUIRKS
from dispatcher.smtp.stages import Stage
from dispatcher.smtp.transcript import TransactionLog

WINDOW = 2


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One message for ``send_stream``; ``key`` is the caller's and comes back with the outcome."""

    key: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    log_context: Mapping[str, object] = field(default_factory=dict)
    """Bound on the log events of this message's commands and replies (the stream interleaves them)."""


Outcome = tuple[Outgoing, SendResult | SmtpError]


@dataclass
class _InFlight:
    message: Outgoing
    tx: Transaction
    log: TransactionLog
    """Its lines, told as one ``smtp_transaction`` event when it ends (``transcript``)."""
    follows: bool = False
    """Written while another transaction was open on the wire: it opens with RSET."""
    opened: bool = False
    expect: deque[Stage] = field(default_factory=deque)


class MessageStream:
    """One pass over ``source`` on an open connection's ``channel``; see the module docstring.

    ``on_break`` is called when the connection may not be used again (it broke, an RSET failed, or the
    caller stopped mid-dialogue): the owner of the connection drops it. ``before_data`` (optional) is
    called for each message right before the write that carries its data.
    """

    def __init__(
        self,
        channel: Channel,
        source: Iterator[Outgoing],
        may_follow: Callable[[], bool] | None = None,
        *,
        on_break: Callable[[], None],
        before_data: Callable[[Outgoing], None] | None = None,
    ) -> None:
        self.channel = channel
        self.on_break = on_break
        self.before_data = before_data
        self.source = source
        self.may_follow = may_follow
        self.inflight: deque[_InFlight] = deque()
        self.done: deque[Outcome] = deque()
        self.exhausted = False
        self.rset_first = False
        self.again: deque[Outgoing] = deque()
        """Followers refused out of sequence, to go again alone before anything new is pulled."""
        self.resent: set[int] = set()
        config = channel.config
        self.crosses_end_of_data = SERVER_QUIRKS.pipelines_after_data(config.host, config.port)

    def in_flight(self) -> list[tuple[Outgoing, bool]]:
        """The messages on the wire now, each with whether all of its data was written (and any waiting to
        go again, whose data was not)."""
        on_wire = [(item.message, item.tx.data_complete) for item in self.inflight]
        return on_wire + [(message, False) for message in self.again]

    def run(self) -> Iterator[Outcome]:
        try:
            while True:
                self._fill()
                yield from self._hand_back()
                if not self.inflight:
                    # the last message was refused before its data: leave no envelope behind
                    if self.rset_first and not self.channel.rset():
                        self.on_break()
                    return
                self._advance(self.inflight[0])
                yield from self._hand_back()
        except SmtpError as exc:
            self.on_break()
            self._fail_inflight(exc)
            yield from self._hand_back()
        except BaseException as exc:  # the caller stopped early, or an interruption came mid-dialogue
            for item in self.inflight:  # (maybe in a later job's context: put back as it was)
                with structlog.contextvars.bound_contextvars(**item.message.log_context):
                    self.channel.transcript.finish(item.log, exc)
            raise
        finally:
            if self.inflight:
                self.on_break()

    def _hand_back(self) -> Iterator[Outcome]:
        while self.done:
            yield self.done.popleft()

    def _pull(self, follows: bool) -> _InFlight | None:
        """The next message as a transaction — one to go again first; messages refused locally (SIZE,
        SMTPUTF8…) go to ``done``."""
        channel = self.channel
        if self.again:  # already counted against the connection's cap when it was first pulled
            return self._in_flight(self.again.popleft(), follows)
        while not self.exhausted:
            if channel.mail_refused is not None or (
                channel.messages + len(self.inflight) >= channel.config.max_messages
            ):
                self.exhausted = True
                break
            message = next(self.source, None)
            if message is None:
                self.exhausted = True
                break
            try:
                return self._in_flight(message, follows)
            except SmtpError as exc:
                self.done.append((message, exc))
        return None

    def _in_flight(self, message: Outgoing, follows: bool) -> _InFlight:
        """``message`` as a transaction; a local refusal (SIZE, SMTPUTF8…) raises here."""
        tx = self.channel.transaction(message.sender, message.recipients, message.data)
        return _InFlight(message, tx, self.channel.transcript.transaction(message.key), follows)

    def _fill(self) -> None:
        """Put a message on the wire when none is, and more while the last one is a whole CHUNKING write."""
        while not self.inflight or (
            len(self.inflight) < WINDOW and self.inflight[-1].tx.chunked and self.crosses_end_of_data
        ):
            item = self._pull(follows=bool(self.inflight))
            if item is None:
                return
            step = item.tx.next_step()
            assert step is not None
            self.inflight.append(item)
            self._write(item, step, None)

    def _advance(self, head: _InFlight) -> None:
        """Read the head's replies; when its data is due, write it with the next message's envelope; then
        hand its outcome back."""
        self._read_expected(head)
        step = head.tx.next_step()
        if step is not None:  # DATA path: 354 came back, the data goes now — with the next envelope only
            # if that one may go at once: the data must not wait for the next message's turn
            nxt = None
            if self.crosses_end_of_data and (self.may_follow is None or self.may_follow()):
                nxt = self._pull(follows=True)
            self._write(head, step, nxt)
            self._read_expected(head)
        assert head.tx.finished, "a pipelined transaction ends with its data or before it"
        self.inflight.popleft()
        self.channel.transcript.finish(head.log)
        if head.follows and head.tx.refused_out_of_sequence and id(head.message) not in self.resent:
            self._go_again(head)
            return
        self.channel.ended()
        self.done.append((head.message, self.channel.result(head.tx, 1)))
        if not head.tx.data_sent and head.tx.needs_rset:
            self.rset_first = True

    def _go_again(self, item: _InFlight) -> None:
        """``item`` was refused for following another transaction: send it alone, and stop following."""
        self.resent.add(id(item.message))
        self.again.append(item.message)
        self.rset_first = True
        reply = item.tx.deciding_reply()
        self.channel.event("smtp_stream_resend_unpipelined", reason=reply.summary() if reply else "503")
        if self.crosses_end_of_data:
            self.crosses_end_of_data = False
            config = self.channel.config
            if SERVER_QUIRKS.stop_pipelining_after_data(config.host, config.port):
                self.channel.event(
                    "smtp_stream_stops_pipelining_after_data",
                    host=config.host,
                    port=config.port,
                    reason=reply.summary() if reply else "503",
                )

    def _write(self, item: _InFlight, step: Step, follower: _InFlight | None) -> None:
        """Write ``step`` of ``item`` — after an RSET if one is owed — and ``follower``'s first step."""
        payload, lines, expect = self._opening(item, step)
        data_size = step.data_size if step.is_data else 0
        self._bind(item)
        self.channel.log(lines, data_size=data_size)
        follow = follower.tx.next_step() if follower is not None else None
        follow_expect: list[Stage] = []
        if follower is not None and follow is not None:
            follow_payload, follow_lines, follow_expect = self._opening(follower, follow)
            payload += follow_payload
            self._bind(follower)
            self.channel.log(follow_lines)
            self.inflight.append(follower)  # before the write: a break must give it an outcome too
        if self.before_data is not None:
            for carried, carried_step in ((item, step), (follower, follow)):
                if carried is not None and carried_step is not None and carried_step.is_data:
                    self.before_data(carried.message)
        self.channel.send(payload, data_size=data_size, stage=lines[0][0] if lines else Stage.DATA_BLOCK)
        if step.is_data:
            item.tx.data_written()
        item.expect.extend(expect)
        if follower is not None:
            follower.expect.extend(follow_expect)

    def _opening(self, item: _InFlight, step: Step) -> tuple[bytes, list[tuple[Stage, str]], list[Stage]]:
        """``step`` as written: a transaction's first step opens with RSET when it follows another or
        when the last one was refused before its data."""
        payload, lines, expect = step.payload, list(step.lines), list(step.expect)
        if not item.opened:
            item.opened = True
            if item.follows or self.rset_first:
                payload, expect = commands.rset() + payload, [Stage.RSET, *expect]
                lines.insert(0, (Stage.RSET, "RSET"))
                self.rset_first = False
        return payload, lines, expect

    def _read_expected(self, item: _InFlight) -> None:
        self._bind(item)
        while item.expect:
            stage = item.expect.popleft()
            reply = self.channel.read(stage)
            if stage is not Stage.RSET:  # RSET's own failure is ignored, as after any failed transaction
                item.tx.receive(stage, reply)

    def _bind(self, item: _InFlight) -> None:
        """What is logged from here on is ``item``'s: its context bound, its transaction's lines selected."""
        if item.message.log_context:
            structlog.contextvars.bind_contextvars(**item.message.log_context)
        self.channel.transcript.select(item.log)

    def _fail_inflight(self, exc: SmtpError) -> None:
        """Every message still on the wire gets an outcome from the break, in order."""
        for item in self.inflight:
            self._bind(item)
            self.channel.transcript.finish(item.log, exc)
            self.done.append((item.message, error_after_break(item.tx, exc)))
        self.inflight.clear()
        while self.again:  # refused out of sequence and not yet sent again: nothing of it was executed
            self.done.append((self.again.popleft(), exc.with_outcomes(())))
