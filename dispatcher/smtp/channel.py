"""One open SMTP connection as the transaction drivers use it: write a step, read a reply, RSET, the
transcript, and the counters of what the connection carried.

Both drivers go through it — ``SmtpClient.send`` (one transaction, ``session``) and ``MessageStream``
(back to back, ``stream``) — so neither reaches into the other. The channel never decides anything: the
sans-IO ``Transaction`` says what to write and what each reply means, and the client owns the
connection's lifecycle (open, reuse, close). A 421 read on any command raises ``ServiceClosing`` here,
for every caller (RFC 5321 §3.8).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from dispatcher.errors import PolicyError, ReplyError, ServiceClosing, SmtpError
from dispatcher.smtp import commands
from dispatcher.smtp.config import SmtpConfig
from dispatcher.smtp.connection import Connection
from dispatcher.smtp.extensions import Extensions
from dispatcher.smtp.outcomes import SendResult
from dispatcher.smtp.protocol import Transaction
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage
from dispatcher.smtp.transcript import Transcript


class Channel:
    """The I/O of one open connection; see the module docstring."""

    def __init__(self, conn: Connection, transcript: Transcript, config: SmtpConfig, conn_id: str) -> None:
        self.conn = conn
        self.transcript = transcript
        self.config = config
        self.conn_id = conn_id
        self.extensions = Extensions.none()
        self.messages = 0
        """Transactions that ended on this connection (its ``max_messages`` cap counts these)."""
        self.data_in_flight = False
        """Message data is being written: an interruption now may leave the message delivered."""
        self.mail_refused: Reply | None = None
        """A 4xx this server gave a MAIL: the session may refuse every later one too (OpenSMTPD past its
        per-session cap answers each ``452 4.5.3 Too many messages sent``), so it takes no new message."""
        self.opened_at = self.last_used = time.monotonic()

    def transaction(self, sender: str, recipients: Sequence[str], data: bytes) -> Transaction:
        """A transaction for the current extensions; bad arguments and local refusals raise here."""
        targets = check_envelope(sender, recipients)
        return Transaction(
            sender, targets, data, self.extensions, self.config.pipelining, self.config.chunking
        )

    def log(self, lines: Sequence[tuple[Stage, str]], *, data_size: int = 0) -> None:
        for stage, line in lines:
            self.transcript.command(stage, line)
        if data_size:
            self.transcript.data(Stage.DATA_BLOCK, data_size)

    def event(self, name: str, **fields: Any) -> None:
        self.transcript.event(name, **fields)

    def write(self, payload: bytes, lines: Sequence[tuple[Stage, str]], *, data_size: int) -> None:
        """Log ``lines`` and write ``payload`` (a step of a transaction)."""
        self.log(lines, data_size=data_size)
        self.send(payload, data_size=data_size, stage=lines[0][0] if lines else Stage.MAIL)

    def send(self, payload: bytes, *, data_size: int, stage: Stage) -> None:
        """Message data goes block by block under the data-block deadline; commands under ``stage``'s."""
        if data_size:
            self.data_in_flight = True
            self.conn.send_data(payload)
        else:
            self.conn.send(payload, stage)
        self.last_used = time.monotonic()

    def read(self, stage: Stage) -> Reply:
        """Read one reply; a 421 on any command means the server is closing (RFC 5321 §3.8)."""
        reply = self.conn.read_reply(stage)
        self.transcript.reply(stage, reply)
        if stage is Stage.MAIL and 400 <= reply.code < 500:
            self.mail_refused = reply
        if reply.code == 421:
            raise ServiceClosing("the server is closing the connection", stage=stage, reply=reply)
        return reply

    def expect(self, stage: Stage, ok: set[int] | None) -> Reply:
        reply = self.read(stage)
        if ok is not None and reply.code not in ok:
            raise ReplyError(f"unexpected reply to {stage.value}", stage=stage, reply=reply)
        return reply

    def command(self, stage: Stage, line: bytes, ok: set[int] | None) -> Reply:
        """One command, one reply (lock-step)."""
        self.transcript.command(stage, line.decode("utf-8").rstrip("\r\n"))
        self.conn.send(line, stage)
        self.last_used = time.monotonic()
        return self.expect(stage, ok)

    def rset(self) -> bool:
        """RSET after a transaction that did not end accepted. False when RSET failed: the caller drops
        the connection and keeps the transaction's own outcome (aiosmtplib's habit)."""
        try:
            self.command(Stage.RSET, commands.rset(), {250})
        except SmtpError as exc:
            self.transcript.event("smtp_rset_failed", reason=str(exc))
            return False
        return True

    def ended(self) -> None:
        """A transaction ended with its replies: count it; no data of it is in flight any more."""
        self.data_in_flight = False
        self.messages += 1
        self.last_used = time.monotonic()

    def result(self, tx: Transaction, round_trips: int) -> SendResult:
        """``tx``'s result, with the transcript so far."""
        return SendResult(
            tx.outcomes(), tx.deciding_reply(), self.conn_id, tuple(self.transcript.entries), round_trips
        )


def check_envelope(sender: str, recipients: Sequence[str]) -> tuple[str, ...]:
    """The recipients as a tuple, after every address passed the command-line guard; raises before
    anything is sent."""
    commands.check_address(sender, "sender")
    targets = tuple(commands.check_address(r, "recipient") for r in recipients)
    if not targets:
        raise PolicyError("no recipients given", stage=Stage.RCPT)
    return targets
