"""ScriptedSmtpServer: a small threaded raw-socket SMTP server that misbehaves on request.

It speaks enough SMTP for a client to run a whole dialogue (greeting, EHLO/HELO, STARTTLS, AUTH PLAIN/LOGIN/
XOAUTH2, MAIL, RCPT, DATA, BDAT, RSET, NOOP, QUIT) and lets a test break any stage:

    ScriptedSmtpServer(
        ehlo_keywords=["PIPELINING", "CHUNKING", "SIZE 1000"],
        faults={"mail": Fault("reply", b"421 4.3.2 shutting down\\r\\n"), "data_end": Fault("hang")},
        faults_on_connection=2,              # only the 2nd connection misbehaves
    )

Stage names are the values of ``dispatcher.smtp.stages.Stage``: ``greeting``, ``ehlo``, ``helo``,
``starttls`` (the 220), ``tls_handshake`` (instead of the handshake), ``auth`` (first reply to the AUTH
line), ``mail``, ``rcpt``, ``data`` (the 354), ``data_block`` (as soon as message bytes arrive),
``bdat`` (reply to a non-LAST chunk), ``data_end`` (reply after the final dot or BDAT LAST), ``rset``,
``noop``, ``quit``. Actions: ``reply`` (send these raw bytes instead; a reply starting ``421`` closes the
connection after it), ``drop`` (close without answering), ``hang`` (answer nothing more, keep the socket
open and keep reading until the client or ``stop()`` closes it), ``split`` (send the normal reply one byte per
``send()`` with TCP_NODELAY), ``hold`` (set ``server.holding``, wait for ``server.release``, then answer the
payload or the normal reply).

Two strictness modes copy real servers that are within the RFCs but less forgiving than most:
``strictness="exim"`` (Exim 4.96): a refused ``DATA``/``BDAT`` (no valid recipient) keeps the envelope, so a
later ``MAIL`` without ``RSET`` gets ``503 sender already given`` while the following ``RCPT`` and data are
taken under the *old* sender. ``strictness="haraka"`` (Haraka 3.3): every command that arrived before the
reply to the final dot was sent (pipelined after end of DATA) is refused with a 503 and not executed.

Replies are written like a real server does: buffered while more complete commands are waiting in the
input (a pipelined group gets its replies in one write), flushed before the server waits for input.

Round trips (``ConnectionRecord.round_trips``): counted each time the server has sent at least one reply
since it last received bytes and then needs more client bytes to go on (a command line, or message content
after the 354) — i.e. the client had to see our replies before the dialogue could continue. Replies stay
buffered while a BDAT chunk is read, so a chunk arriving in pieces adds nothing. Counted from the first
MAIL command of the connection on (``waits`` counts the same events including setup: greeting, EHLO,
STARTTLS, AUTH). The count does not depend on thread timing. A pipelining client with CHUNKING makes one
round trip per message (waiting for its final reply); with DATA one per message plus one at best; smtplib
(no pipelining) makes four per single-recipient message. A client that writes one pipelined group with
several ``send()`` calls may be counted extra when the server reads between them.
"""

from __future__ import annotations

import contextlib
import re
import select
import socket
import ssl
import threading
import time
from base64 import b64decode
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

FaultAction = Literal["reply", "drop", "hang", "split", "hold"]
Strictness = Literal["exim", "haraka"]
HARAKA_PIPELINED_AFTER_DATA = b"503 Bad sequence of commands - pipelined after end of DATA\r\n"
EXIM_SENDER_GIVEN = b"503 sender already given\r\n"
EXIM_NO_VALID_RCPT = b"503 valid RCPT command must precede DATA\r\n"
TOO_MANY_RECIPIENTS = b"452 4.5.3 Error: too many recipients\r\n"
TOO_MANY_MESSAGES = b"452 4.5.3 Too many recipients: Too many messages sent\r\n"
"""OpenSMTPD's answer to every MAIL past its per-session cap (``smtpd.conf`` ``max-mails``, 100)."""


@dataclass(frozen=True)
class Fault:
    """What to do at a stage; ``occurrence`` = only the N-th time the stage occurs on the connection."""

    action: FaultAction
    payload: bytes = b""
    occurrence: int | None = None


@dataclass
class AuthAttempt:
    mechanism: str
    responses: list[bytes]  # decoded client data: initial response and every challenge answer


@dataclass
class ScriptedMessage:
    """A message as it arrived. ``raw`` = wire bytes (DATA: incl. dot-stuffing and the final ``.\\r\\n``;
    BDAT: the chunks joined); ``data`` = decoded content; ``final_reply`` None if none was sent; ``at`` =
    ``time.monotonic()`` when its data had all arrived."""

    connection_id: int
    mail_from: str
    mail_params: list[str]
    rcpt_tos: list[str]
    raw: bytes
    data: bytes
    chunks: list[bytes]
    via: Literal["DATA", "BDAT"]
    final_reply: bytes | None = None
    at: float = field(default_factory=time.monotonic)


@dataclass
class ConnectionRecord:
    """Everything one connection did.

    ``lines``: every command line (and AUTH answer) verbatim, with its line ending; message content is in
    ``ScriptedMessage``. ``ended``: eof | quit | fault | stopped | error.
    """

    id: int
    lines: list[bytes] = field(default_factory=list)
    tls: bool = False
    discarded_after_starttls: bytes = b""
    auth: list[AuthAttempt] = field(default_factory=list)
    round_trips: int = 0
    waits: int = 0
    writes: int = 0  # send()/sendall() calls made for replies: a "split" reply adds one per byte
    fault_fired: str | None = None
    received_while_hung: bytearray = field(default_factory=bytearray)
    ended: str | None = None
    closed: threading.Event = field(default_factory=threading.Event)


class _Close(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


_DEFAULT_KEYWORDS = ("PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SIZE 10485760")
_ADDRESS = re.compile(rb"^\s*(?:FROM|TO)\s*:\s*<([^>]*)>\s*(.*)$", re.IGNORECASE)


class ScriptedSmtpServer:
    """See the module docstring. Start with ``start()`` or ``with``; ``.port`` is the bound port."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hostname: str = "scripted.test",
        greeting: bytes = b"220 scripted.test ESMTP ready\r\n",
        ehlo_keywords: Sequence[str] = _DEFAULT_KEYWORDS,
        replies: Mapping[str, bytes] | None = None,
        faults: Mapping[str, Fault] | None = None,
        faults_on_connection: int | None = None,
        per_recipient: Mapping[str, bytes] | None = None,
        raw_script: Sequence[bytes] | None = None,
        after_raw_script: Literal["hang", "close", "dialogue"] = "hang",
        starttls_context: ssl.SSLContext | None = None,
        auth_reply: bytes | None = None,
        strictness: Strictness | None = None,
        max_rcpts: int | None = None,
        max_mails: int | None = None,
    ) -> None:
        """``max_rcpts``: recipients one transaction takes; every RCPT after them gets Postfix's
        ``452 4.5.3 Error: too many recipients`` (RFC 5321 §4.5.3.1.10). ``replies``: per-stage reply
        overrides on every connection. ``faults`` and ``raw_script`` apply
        on connection number ``faults_on_connection`` (1-based) or on all when None. ``raw_script`` is sent
        on connect instead of the greeting, one ``send()`` per item; then ``after_raw_script`` decides."""
        self.host, self.port, self.hostname = host, port, hostname
        self.greeting = greeting
        self.ehlo_keywords = list(ehlo_keywords)
        self.replies = {str(k): v for k, v in (replies or {}).items()}
        self.faults = {str(k): v for k, v in (faults or {}).items()}
        self.faults_on_connection = faults_on_connection
        self.per_recipient = {k.lower(): v for k, v in (per_recipient or {}).items()}
        self.raw_script = list(raw_script) if raw_script is not None else None
        self.after_raw_script = after_raw_script
        self.starttls_context = starttls_context
        self.auth_reply = auth_reply
        self.strictness = strictness
        self.max_rcpts = max_rcpts
        self.max_mails = max_mails
        """Transactions one connection takes; every MAIL after them gets OpenSMTPD's ``TOO_MANY_MESSAGES``."""
        self.records: list[ConnectionRecord] = []
        self._messages: list[ScriptedMessage] = []
        self._cond = threading.Condition()
        self._listener: socket.socket | None = None
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self.holding = threading.Event()
        """Set when a ``hold`` fault is waiting; ``release.set()`` lets it answer."""
        self.release = threading.Event()

    # --- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        listener = socket.create_server((self.host, self.port))
        self.port = listener.getsockname()[1]
        self._listener = listener
        thread = threading.Thread(target=self._accept_loop, name=f"scripted-smtp-{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self) -> None:
        """Close the listener and every connection (hung clients see EOF), join the threads. Idempotent."""
        self._stopping.set()
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        for thread in list(self._threads):
            thread.join(timeout=5)

    def __enter__(self) -> ScriptedSmtpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- what tests read -------------------------------------------------------------------------------

    @property
    def connection_count(self) -> int:
        with self._cond:
            return len(self.records)

    @property
    def messages(self) -> list[ScriptedMessage]:
        with self._cond:
            return list(self._messages)

    @property
    def round_trips(self) -> int:
        """Sum of ``round_trips`` over all connections (see the module docstring)."""
        with self._cond:
            return sum(record.round_trips for record in self.records)

    def lines(self, connection: int | None = None) -> list[bytes]:
        """Every command line received (verbatim), of one connection (1-based id) or of all."""
        with self._cond:
            return [ln for r in self.records if connection in (None, r.id) for ln in list(r.lines)]

    def commands(self, connection: int | None = None) -> list[str]:
        """The command verbs received, upper-cased (``["EHLO", "MAIL", "RCPT", ...]``)."""
        verbs = [line.split(b" ", 1)[0].strip().upper() for line in self.lines(connection)]
        return [verb.decode("ascii", "replace") for verb in verbs]

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[ScriptedMessage]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(f"expected {count} message(s), got {len(self._messages)}: {self.lines()}")
            return list(self._messages)

    def wait_for_connections(self, count: int, timeout: float = 10.0) -> list[ConnectionRecord]:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.records) >= count, timeout):
                raise TimeoutError(f"expected {count} connection(s), got {len(self.records)}")
            return list(self.records)

    def wait_closed(self, connection: int, timeout: float = 10.0) -> ConnectionRecord:
        """Wait until connection ``connection`` (1-based) has ended; its ``ended`` says how."""
        record = self.wait_for_connections(connection, timeout)[connection - 1]
        if not record.closed.wait(timeout):
            raise TimeoutError(f"connection {connection} still open after {timeout}s: {record.lines}")
        return record

    # --- serving ---------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._listener is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._cond:
                if self._stopping.is_set():
                    sock.close()
                    return
                record = ConnectionRecord(id=len(self.records) + 1)
                self.records.append(record)
                self._sockets.add(sock)
                self._cond.notify_all()
            session = _Session(self, sock, record)
            thread = threading.Thread(target=session.run, name=f"scripted-smtp-conn-{record.id}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _add_message(self, message: ScriptedMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _replace_socket(self, old: socket.socket, new: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(old)
            self._sockets.add(new)
            if self._stopping.is_set():
                _shutdown(new)

    def _forget_socket(self, sock: socket.socket) -> None:
        with self._cond:
            self._sockets.discard(sock)
            self._cond.notify_all()


def _shutdown(sock: socket.socket) -> None:
    # socket.socket.shutdown, not SSLSocket.shutdown: the latter drops the TLS object under a reader thread.
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _b64(text: bytes) -> bytes | None:
    try:
        return b64decode(text, validate=True)
    except ValueError:
        return None


def _undot(content: bytes) -> bytes:
    return re.sub(rb"(^|\r\n)\.", rb"\1", content)


class _Session:
    """One connection's dialogue, run on its own thread."""

    def __init__(self, server: ScriptedSmtpServer, sock: socket.socket, record: ConnectionRecord) -> None:
        self.server, self.sock, self.record = server, sock, record
        self.faulty = server.faults_on_connection in (None, record.id)
        self.buffer = b""
        self.out: list[bytes] = []
        self.replied = False  # a reply was flushed since bytes last arrived
        self.in_mail_phase = False
        self.stage_counts: dict[str, int] = {}
        self.mail_from: str | None = None
        self.mail_params: list[str] = []
        self.rcpts: list[str] = []
        self.mails_taken = 0
        self.chunks: list[bytes] = []
        self.pipelined_after_data = 0  # bytes that arrived before the reply to the final dot (haraka)

    def run(self) -> None:
        ended = "error"
        try:
            self._converse()
        except _Close as close:
            ended = close.reason
        except (OSError, ValueError):
            ended = "stopped" if self.server._stopping.is_set() else "error"
        finally:
            self.record.ended = self.record.ended or ended
            try:
                self.sock.close()
            finally:
                self.server._forget_socket(self.sock)
                self.record.closed.set()

    # --- I/O -------------------------------------------------------------------------------------------

    def _flush(self) -> None:
        if self.out:
            self.sock.sendall(b"".join(self.out))
            self.record.writes += 1
            self.out.clear()
            self.replied = True

    def _recv(self, flush: bool = True) -> None:
        """Read more client bytes, flushing queued replies first; count the wait as described."""
        if flush:
            self._flush()
        if self.replied:
            self.record.waits += 1
            if self.in_mail_phase:
                self.record.round_trips += 1
        data = self.sock.recv(65536)
        if not data:
            raise _Close("stopped" if self.server._stopping.is_set() else "eof")
        self.replied = False
        self.buffer += data

    def _read_line(self) -> bytes:
        while b"\n" not in self.buffer:
            self._recv()
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def _drain_readable(self) -> None:
        """Take in every byte the client has already sent, without waiting for more."""
        while True:
            pending = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending() > 0
            if not pending and not select.select([self.sock], [], [], 0)[0]:
                return
            data = self.sock.recv(65536)
            if not data:
                return
            self.buffer += data

    def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._recv(flush=False)  # RFC 3030: the chunk follows BDAT at once; nobody waits on replies
        chunk, self.buffer = self.buffer[:size], self.buffer[size:]
        return chunk

    def _hang(self) -> None:
        self._flush()
        self.record.received_while_hung += self.buffer
        while True:
            data = self.sock.recv(65536)
            if not data:
                raise _Close("stopped" if self.server._stopping.is_set() else "eof")
            self.record.received_while_hung += data

    # --- replies and faults ----------------------------------------------------------------------------

    def _answer(self, stage: str, normal: bytes) -> bytes:
        """Queue the reply for ``stage`` (a fault, else an override, else ``normal``) and return it."""
        count = self.stage_counts[stage] = self.stage_counts.get(stage, 0) + 1
        fault = self.server.faults.get(stage) if self.faulty else None
        if fault is not None and fault.occurrence not in (None, count):
            fault = None
        reply = self.server.replies.get(stage, normal)
        if fault is not None:
            self.record.fault_fired = stage
            if fault.action == "drop":
                self._flush()
                raise _Close("fault")
            if fault.action == "hang":
                self._hang()
            if fault.action == "hold":  # answer (the payload, else normally) once the test says so
                self._flush()
                self.server.holding.set()
                self.server.release.wait()
                reply = fault.payload or reply
                self.out.append(reply)
                return reply
            if fault.action == "split":
                self._flush()
                for byte in reply:
                    self.sock.sendall(bytes([byte]))
                    self.record.writes += 1
                self.replied = True
                return reply
            reply = fault.payload
        self.out.append(reply)
        if reply.startswith(b"421"):
            self._flush()
            raise _Close("fault")
        return reply

    # --- the dialogue ----------------------------------------------------------------------------------

    def _converse(self) -> None:
        script = self.server.raw_script if self.faulty else None
        if script is not None:
            for item in script:
                self.sock.sendall(item)
            self.replied = True
            if self.server.after_raw_script == "close":
                raise _Close("fault")
            if self.server.after_raw_script == "hang":
                self._hang()
        else:
            self._answer("greeting", self.server.greeting)
        while True:
            line = self._read_line()
            self.record.lines.append(line)
            if self.pipelined_after_data > 0:
                self.pipelined_after_data -= len(line)
                self.out.append(HARAKA_PIPELINED_AFTER_DATA)
                continue
            verb, _, arg = line.rstrip(b"\r\n").partition(b" ")
            handler = getattr(self, f"_do_{verb.upper().decode('ascii', 'replace')}", None)
            if handler is None:
                self.out.append(b"502 5.5.2 Error: command not recognized\r\n")
            else:
                handler(arg.strip())

    def _reset(self) -> None:
        self.mail_from, self.mail_params, self.rcpts = None, [], []

    def _do_EHLO(self, arg: bytes) -> None:
        self._reset()
        keywords = [k for k in self.server.ehlo_keywords if not (self.record.tls and k.upper() == "STARTTLS")]
        lines = [self.server.hostname, *keywords]
        reply = b"".join(
            f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n".encode() for i, text in enumerate(lines)
        )
        self._answer("ehlo", reply)

    def _do_HELO(self, arg: bytes) -> None:
        self._reset()
        self._answer("helo", f"250 {self.server.hostname}\r\n".encode())

    def _do_STARTTLS(self, arg: bytes) -> None:
        context = self.server.starttls_context
        if context is None or self.record.tls:
            self._answer("starttls", b"454 4.7.0 TLS not available\r\n")
            return
        self._answer("starttls", b"220 2.0.0 Ready to start TLS\r\n")
        self._flush()
        # RFC 3207: anything the client pipelined after STARTTLS must be discarded, not executed.
        self.record.discarded_after_starttls, self.buffer = self.buffer, b""
        self._answer_handshake(context)

    def _answer_handshake(self, context: ssl.SSLContext) -> None:
        fault = self.server.faults.get("tls_handshake") if self.faulty else None
        if fault is not None:
            self.record.fault_fired = "tls_handshake"
            if fault.action == "reply":
                self.sock.sendall(fault.payload)
            if fault.action == "hang":
                self._hang()
            raise _Close("fault")
        self.sock.settimeout(10)
        plain = self.sock
        self.sock = context.wrap_socket(plain, server_side=True)
        self.server._replace_socket(plain, self.sock)
        self.sock.settimeout(None)
        self.record.tls = True
        self._reset()

    def _do_AUTH(self, arg: bytes) -> None:
        mechanism, _, initial = arg.partition(b" ")
        name = mechanism.upper().decode("ascii", "replace")
        attempt = AuthAttempt(name, [])
        self.record.auth.append(attempt)
        prompts = {"PLAIN": [b""], "LOGIN": [b"VXNlcm5hbWU6", b"UGFzc3dvcmQ6"], "XOAUTH2": [b""]}.get(name)
        if prompts is None:
            self._answer("auth", b"504 5.5.4 Unrecognized authentication type\r\n")
            return
        if initial:
            if (decoded := _b64(initial)) is None:
                self._answer("auth", b"501 5.5.2 Cannot decode base64\r\n")
                return
            attempt.responses.append(decoded)
            prompts = prompts[1:]
        first = True
        for prompt in prompts:
            if first:
                self._answer("auth", b"334 " + prompt + b"\r\n")
                first = False
            else:
                self.out.append(b"334 " + prompt + b"\r\n")
            answer = self._read_line()
            self.record.lines.append(answer)
            if answer.strip() == b"*":
                self.out.append(b"501 5.7.0 Authentication aborted\r\n")
                return
            if (decoded := _b64(answer.strip())) is None:
                self.out.append(b"501 5.5.2 Cannot decode base64\r\n")
                return
            attempt.responses.append(decoded)
        final = self.server.auth_reply or b"235 2.7.0 Authentication successful\r\n"
        if first:
            self._answer("auth", final)
        else:
            self.out.append(final)
            if final.startswith(b"421"):
                self._flush()
                raise _Close("fault")

    def _do_MAIL(self, arg: bytes) -> None:
        self.in_mail_phase = True
        if self.server.strictness == "exim" and self.mail_from is not None:
            self._answer("mail", EXIM_SENDER_GIVEN)
            return
        match = _ADDRESS.match(arg)
        if match is None:
            self._answer("mail", b"501 5.5.4 Syntax: MAIL FROM:<address>\r\n")
            return
        self._reset()
        if self.server.max_mails is not None and self.mails_taken >= self.server.max_mails:
            self._answer("mail", TOO_MANY_MESSAGES)
            return
        self.mail_from = match.group(1).decode("utf-8", "surrogateescape")
        self.mail_params = match.group(2).decode("utf-8", "surrogateescape").split()
        if self._answer("mail", b"250 2.1.0 Ok\r\n").startswith(b"2"):
            self.mails_taken += 1

    def _do_RCPT(self, arg: bytes) -> None:
        match = _ADDRESS.match(arg)
        if self.mail_from is None or match is None:
            refusal = b"503 5.5.1 Error: need MAIL command\r\n" if match else b"501 5.5.4 Syntax\r\n"
            self._answer("rcpt", refusal)
            return
        address = match.group(1).decode("utf-8", "surrogateescape")
        normal = self.server.per_recipient.get(address.lower(), b"250 2.1.5 Ok\r\n")
        cap = self.server.max_rcpts
        if cap is not None and len(self.rcpts) >= cap:
            normal = TOO_MANY_RECIPIENTS
        if self._answer("rcpt", normal).startswith(b"2"):
            self.rcpts.append(address)

    def _transaction_refusal(self) -> bytes | None:
        if self.mail_from is None:
            return b"503 5.5.1 Error: need MAIL command\r\n"
        if not self.rcpts:
            if self.server.strictness == "exim":
                return EXIM_NO_VALID_RCPT
            return b"554 5.5.1 Error: no valid recipients\r\n"
        return None

    def _do_DATA(self, arg: bytes) -> None:
        refusal = self._transaction_refusal()
        if refusal is not None:
            self._answer("data", refusal)
            return
        self._answer("data", b"354 End data with <CR><LF>.<CR><LF>\r\n")
        self._data_block_fault()
        # The DATA line ended with CRLF, so the terminator may come first: search with a virtual CRLF.
        while (end := (b"\r\n" + self.buffer).find(b"\r\n.\r\n")) < 0:
            self._recv()
        raw, self.buffer = self.buffer[: end + 3], self.buffer[end + 3 :]
        if self.server.strictness == "haraka":
            self._drain_readable()
            self.pipelined_after_data = len(self.buffer)
        self._finish("DATA", raw, _undot(raw[:end]), [])

    def _do_BDAT(self, arg: bytes) -> None:
        size_text, _, last = arg.partition(b" ")
        if not size_text.isdigit():
            self.out.append(b"501 5.5.4 Syntax: BDAT size [LAST]\r\n")
            return
        self._data_block_fault()
        chunk = self._read_exactly(int(size_text))
        self.chunks.append(chunk)
        refusal = self._transaction_refusal()
        if refusal is not None:
            self.chunks = []
            self._answer("data_end" if last else "bdat", refusal)
        elif last.strip().upper() == b"LAST":
            chunks, self.chunks = self.chunks, []
            self._finish("BDAT", b"".join(chunks), b"".join(chunks), chunks)
        else:
            self._answer("bdat", f"250 2.0.0 {len(chunk)} octets received\r\n".encode())

    def _data_block_fault(self) -> None:
        fault = self.server.faults.get("data_block") if self.faulty else None
        if fault is not None:
            self._flush()
            while not self.buffer:
                self._recv()
            self._answer("data_block", b"")

    def _finish(self, via: Literal["DATA", "BDAT"], raw: bytes, data: bytes, chunks: list[bytes]) -> None:
        assert self.mail_from is not None
        message = ScriptedMessage(
            self.record.id, self.mail_from, self.mail_params, self.rcpts, raw, data, chunks, via
        )
        self._reset()
        self.server._add_message(message)
        normal = f"250 2.0.0 Ok: queued as M{self.record.id}x{len(raw)}\r\n".encode()
        message.final_reply = self._answer("data_end", normal)  # stays None on drop / hang

    def _do_RSET(self, arg: bytes) -> None:
        self._reset()
        self.chunks = []
        self._answer("rset", b"250 2.0.0 Ok\r\n")

    def _do_NOOP(self, arg: bytes) -> None:
        self._answer("noop", b"250 2.0.0 Ok\r\n")

    def _do_QUIT(self, arg: bytes) -> None:
        self._answer("quit", b"221 2.0.0 Bye\r\n")
        self._flush()
        raise _Close("quit")
