"""The mail transaction without I/O: which commands go out together, which reply each expects, and what
every reply means for every recipient.

RFC 2920 (PIPELINING): MAIL and RCPT may appear anywhere in a group, DATA only last, so one group is
``MAIL, RCPT…, DATA`` and the message data follows the 354 — two round trips per message. RFC 3030
(CHUNKING): ``BDAT n LAST`` carries the data with it, so ``MAIL, RCPT…, BDAT`` and the data go in one
write — one round trip. Without PIPELINING every command waits for its reply (lock-step); the outcomes are
the same in every mode.

The driver (``session``) calls ``next_step()``, writes the step's payload, reads one reply per expected
stage, feeds each to ``receive()``, and repeats until ``next_step()`` returns ``None``.

What each recipient's outcome is, decided per reply (``outcomes()``). A pipelined group is executed by the
server command by command, so a later 2xx is a fact about what the server did and is never overridden by
an earlier refusal. A 503 ("bad sequence of commands") says the command was *not executed*: it is never a
verdict on the message (transient), and a stream resends a follower refused that way (``stream``).

    MAIL        RCPT (this recipient)  DATA / BDAT … final reply     outcome      because
    2xx         2xx                    2xx                           accepted     delivered
    2xx         2xx                    4xx / 5xx                     as final     the data was refused
    2xx         2xx                    503                           transient    not executed
    2xx         2xx                    none, data not all written    transient    nothing can be delivered
    2xx         2xx                    none, data all written        unknown      may be delivered (driver)
    2xx         4xx / 5xx              any                           as RCPT      this recipient refused
    2xx         503                    any                           transient    not executed
    2xx         none                   any                           transient    no reply for it
    refused     2xx                    2xx                           unknown      the server delivered it
                                                                                  under an envelope not ours
                                                                                  (a stale sender, Exim)
    refused     2xx                    354 (DATA path)               as MAIL      the server holds an
                                                                                  envelope not ours: the
                                                                                  connection is dropped
                                                                                  before any data
                                                                                  (``StaleEnvelope``)
    refused     2xx                    none, data all written        unknown      may be delivered (driver)
    4xx / 5xx   anything else          anything else                 as MAIL      the sender was refused
    503         anything else          anything else                 transient    not executed

"refused" is any non-2xx MAIL reply. With CHUNKING the data goes before any reply is read, so "data all
written" holds as soon as the write is done; without it the data goes only after 354, and only when MAIL
and at least one RCPT were accepted (else an empty message ends a 354 that nobody can receive).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dispatcher.errors import PolicyError, ProtocolError, ReplyError, SmtpError, UnknownOutcome
from dispatcher.smtp import commands
from dispatcher.smtp.extensions import Extensions
from dispatcher.smtp.outcomes import BAD_SEQUENCE, RecipientOutcome, RecipientStatus, status_of
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage


class StaleEnvelope(ProtocolError):
    """The server opened DATA (354) for a transaction whose MAIL it had refused: it holds an envelope
    that is not ours. No data is sent; the driver drops the connection (a server discards a message whose
    final dot never came). ``outcomes`` carry MAIL's verdict for every recipient."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(
            "the server opened DATA for a transaction whose MAIL FROM it refused (a stale envelope); "
            "the connection was dropped before any data",
            stage=Stage.DATA,
            reply=reply,
            transient=True,
            route_level=False,
        )


@dataclass(frozen=True, slots=True)
class Step:
    """Bytes to write, and the stage of each reply they draw, in order (empty: no reply expected)."""

    payload: bytes
    expect: tuple[Stage, ...]
    lines: tuple[tuple[Stage, str], ...] = ()
    data_size: int = 0
    is_data: bool = False


def mail_parameters(
    extensions: Extensions, sender: str, recipients: Sequence[str], data: bytes
) -> tuple[int | None, str | None, bool]:
    """SIZE, BODY and SMTPUTF8 for MAIL FROM, or a ``PolicyError`` before anything is sent."""
    limit = extensions.size_limit
    if limit is not None and len(data) > limit:
        raise PolicyError(
            f"message is {len(data)} bytes; the server accepts at most {limit} (SIZE)", stage=Stage.MAIL
        )
    body = None
    if commands.has_8bit(data):
        if not extensions.eightbitmime:
            raise PolicyError(
                "message has 8-bit data but the server does not offer 8BITMIME", stage=Stage.MAIL
            )
        body = "8BITMIME"
    smtputf8 = not all(commands.is_ascii(a) for a in (sender, *recipients))
    if smtputf8 and not extensions.smtputf8:
        raise PolicyError("non-ASCII address but the server does not offer SMTPUTF8", stage=Stage.MAIL)
    size = len(data) if extensions.has("SIZE") else None
    return size, body, smtputf8


@dataclass
class Transaction:
    """One message to one set of recipients over an identified connection. See the module docstring."""

    sender: str
    recipients: tuple[str, ...]
    data: bytes
    extensions: Extensions
    pipelining: bool = True
    chunking: bool = True
    data_sent: bool = field(default=False, init=False)
    data_complete: bool = field(default=False, init=False)
    _mail_sent: bool = field(default=False, init=False)
    _rcpts_sent: int = field(default=0, init=False)
    _data_command_sent: bool = field(default=False, init=False)
    _go_ahead: bool = field(default=False, init=False)
    _done: bool = field(default=False, init=False)
    _mail_reply: Reply | None = field(default=None, init=False)
    _rcpt_replies: list[Reply] = field(default_factory=list, init=False)
    _final_reply: Reply | None = field(default=None, init=False)
    _final_stage: Stage = field(default=Stage.DATA_END, init=False)

    def __post_init__(self) -> None:
        self.data = commands.normalize_line_endings(self.data)
        size, body, smtputf8 = mail_parameters(self.extensions, self.sender, self.recipients, self.data)
        self._mail_line = commands.mail_from(self.sender, size=size, body=body, smtputf8=smtputf8)
        self._rcpt_lines = [commands.rcpt_to(r) for r in self.recipients]
        self._pipelined = self.pipelining and self.extensions.pipelining
        self._chunked = self.chunking and self.extensions.chunking

    @property
    def chunked(self) -> bool:
        """The whole message goes in one write (CHUNKING with PIPELINING)."""
        return self._chunked and self._pipelined

    @property
    def finished(self) -> bool:
        return self._done

    @property
    def accepted_count(self) -> int:
        return sum(1 for r in self._rcpt_replies if r.is_positive)

    @property
    def deliverable(self) -> bool:
        """MAIL was accepted and at least one RCPT: the data, once sent, may be delivered."""
        mail = self._mail_reply
        return mail is not None and mail.is_positive and self.accepted_count > 0

    @property
    def needs_rset(self) -> bool:
        """The transaction ended without the message being accepted: RSET before the next one."""
        return self._final_reply is None or not self._final_reply.is_positive

    @property
    def awaiting_final_reply(self) -> bool:
        """Data went out and a recipient may have received it: silence now means the outcome is *unknown*.

        With CHUNKING the data goes out before the RCPT replies are read, so a missing RCPT reply counts.
        """
        if not self.data_complete or self._done:
            return False
        return self.accepted_count > 0 or len(self._rcpt_replies) < len(self.recipients)

    def data_written(self) -> None:
        """The driver wrote the whole data step: only now can the server have the end of the message."""
        self.data_complete = self.data_sent

    @property
    def refused_out_of_sequence(self) -> bool:
        """MAIL got 503 and nothing after it was accepted: the server executed none of it."""
        mail, final = self._mail_reply, self._final_reply
        return (
            mail is not None
            and mail.code == BAD_SEQUENCE
            and self.accepted_count == 0
            and not (final is not None and final.is_positive)
        )

    @property
    def mail_answered(self) -> bool:
        return self._mail_reply is not None

    @property
    def envelope_accepted(self) -> bool:
        """MAIL FROM won a positive reply: from here on, a failure is the message's, not the connection's."""
        return self._mail_reply is not None and self._mail_reply.is_positive

    def next_step(self) -> Step | None:
        """What to write next, once every reply the previous step expects has been received."""
        if self._done:
            return None
        if not self._mail_sent:
            self._mail_sent = True
            if self._pipelined:
                return self._pipelined_group()
            return _command(Stage.MAIL, self._mail_line)
        if self._rcpts_sent < len(self._rcpt_lines):
            self._rcpts_sent += 1
            return _command(Stage.RCPT, self._rcpt_lines[self._rcpts_sent - 1])
        if self._chunked and not self.data_sent:
            return self._bdat_step()
        if not self._data_command_sent:
            self._data_command_sent = True
            return _command(Stage.DATA, commands.data())
        if self._go_ahead and not self.data_sent:
            self.data_sent = True
            # RFC 2920 §3.1: DATA may win 354 although nobody can receive the message; end it empty.
            payload = commands.encode_data(self.data if self.deliverable else b"")
            return Step(payload, (Stage.DATA_END,), (), len(payload), True)
        return None

    def _pipelined_group(self) -> Step:
        self._rcpts_sent = len(self._rcpt_lines)
        lines = [(Stage.MAIL, self._mail_line), *((Stage.RCPT, line) for line in self._rcpt_lines)]
        envelope = b"".join(line for _, line in lines)
        stages = tuple(stage for stage, _ in lines)
        if self._chunked:
            data = self._bdat_step()
            return Step(
                envelope + data.payload,
                stages + data.expect,
                _decoded(lines) + data.lines,
                data.data_size,
                True,
            )
        self._data_command_sent = True
        lines.append((Stage.DATA, commands.data()))
        return Step(envelope + commands.data(), (*stages, Stage.DATA), _decoded(lines))

    def _bdat_step(self) -> Step:
        self.data_sent = True
        line = commands.bdat(len(self.data), last=True)
        return Step(line + self.data, (Stage.BDAT,), _decoded([(Stage.BDAT, line)]), len(self.data), True)

    def receive(self, stage: Stage, reply: Reply) -> None:
        """Take the reply to one command, in the order the commands were sent."""
        if stage is Stage.MAIL:
            self._mail_reply = reply
            if not reply.is_positive and not self._pipelined:
                self._finish(None, stage)
        elif stage is Stage.RCPT:
            self._rcpt_replies.append(reply)
            last = len(self._rcpt_replies) == len(self.recipients)
            if last and not self._pipelined and self.accepted_count == 0:
                self._finish(None, stage)
        elif stage is Stage.DATA:
            if reply.code == 354:
                mail = self._mail_reply
                if mail is not None and not mail.is_positive and self.accepted_count > 0:
                    self._finish(None, stage)
                    raise StaleEnvelope(reply)
                self._go_ahead = True
            else:
                self._finish(reply, stage)
        elif stage in (Stage.DATA_END, Stage.BDAT):
            self._finish(reply, stage)

    def _finish(self, reply: Reply | None, stage: Stage) -> None:
        self._final_reply = reply
        self._final_stage = stage
        self._done = True

    def outcomes(self) -> tuple[RecipientOutcome, ...]:
        """Each recipient's outcome, by the table in the module docstring."""
        result = []
        mail, final = self._mail_reply, self._final_reply
        delivered = final is not None and final.is_positive
        for index, recipient in enumerate(self.recipients):
            rcpt = self._rcpt_replies[index] if index < len(self._rcpt_replies) else None
            if mail is not None and not mail.is_positive:
                if rcpt is not None and rcpt.is_positive and delivered:
                    result.append(
                        RecipientOutcome(recipient, RecipientStatus.UNKNOWN, self._final_stage, final)
                    )
                else:
                    result.append(RecipientOutcome(recipient, status_of(mail), Stage.MAIL, mail))
            elif rcpt is None:
                result.append(RecipientOutcome(recipient, RecipientStatus.TRANSIENT, Stage.RCPT))
            elif not rcpt.is_positive:
                result.append(RecipientOutcome(recipient, status_of(rcpt), Stage.RCPT, rcpt))
            elif final is None:
                result.append(RecipientOutcome(recipient, RecipientStatus.TRANSIENT, self._final_stage))
            else:
                result.append(RecipientOutcome(recipient, status_of(final), self._final_stage, final))
        return tuple(result)

    def deciding_reply(self) -> Reply | None:
        """The reply that ended the transaction, the same in every mode: MAIL's refusal, else the last
        RCPT refusal when nobody was accepted, else the final reply."""
        if self._mail_reply is not None and not self._mail_reply.is_positive:
            final = self._final_reply
            stale_delivery = self.accepted_count > 0 and final is not None and final.is_positive
            return final if stale_delivery else self._mail_reply
        refused = [r for r in self._rcpt_replies if not r.is_positive]
        if self.accepted_count == 0 and refused:
            return refused[-1]
        if self._final_reply is not None:
            return self._final_reply
        return refused[-1] if refused else None


def error_after_break(tx: Transaction, exc: SmtpError) -> SmtpError:
    """What a break (``exc``) leaves ``tx``'s message with: *unknown* once its data may have been
    delivered and no reply ended the dialogue (a 421 is the server saying it processed nothing further),
    else the error itself — each carrying the recipients' outcomes settled so far."""
    outcomes = tx.outcomes()
    if tx.awaiting_final_reply and not isinstance(exc, ReplyError):
        return UnknownOutcome(
            f"message data sent but no reply came back: {exc.message}", stage=exc.stage, outcomes=outcomes
        )
    if not tx.mail_answered and not tx.data_sent:  # a 421 or a drop before MAIL got its reply
        return exc.with_outcomes(outcomes).not_offered()
    return exc.with_outcomes(outcomes)


def _command(stage: Stage, line: bytes) -> Step:
    return Step(line, (stage,), _decoded([(stage, line)]))


def _decoded(lines: Sequence[tuple[Stage, bytes]]) -> tuple[tuple[Stage, str], ...]:
    return tuple((stage, line.decode("utf-8").rstrip("\r\n")) for stage, line in lines)
