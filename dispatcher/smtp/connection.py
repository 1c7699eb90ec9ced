"""The socket: TCP and TLS, a deadline on every wait, OS errors mapped to ours at this one boundary.

Nothing above this module sees ``socket.timeout``, ``ssl.SSLError`` or ``OSError``: ``map_os_errors``
translates them with the stage they happened in (the habit of httpcore's ``map_exceptions``).
"""

from __future__ import annotations

import collections
import contextlib
import select
import socket
import ssl
import time
from collections.abc import Iterator

from dispatcher.errors import ConnectError, ConnectionLost, ProtocolError, StageTimeout, TlsError
from dispatcher.smtp.config import SmtpConfig
from dispatcher.smtp.parser import ReplyParser
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage

RECV_SIZE = 65536
DATA_BLOCK_SIZE = 65536


@contextlib.contextmanager
def map_os_errors(stage: Stage) -> Iterator[None]:
    try:
        yield
    except TimeoutError as exc:
        raise StageTimeout(f"no answer within the {stage.value} deadline", stage=stage) from exc
    except ssl.SSLError as exc:
        raise TlsError(f"TLS failure: {exc.reason or exc}", stage=stage) from exc
    except (ConnectionError, BrokenPipeError) as exc:
        raise ConnectionLost(f"connection lost: {exc.strerror or exc}", stage=stage) from exc
    except OSError as exc:
        raise ConnectionLost(f"socket error: {exc.strerror or exc}", stage=stage) from exc


class Connection:
    """One TCP (optionally TLS) connection to an SMTP server, reading whole replies under deadlines."""

    def __init__(self, sock: socket.socket, config: SmtpConfig) -> None:
        self._sock = sock
        self._config = config
        self._parser = ReplyParser()
        self._ready: collections.deque[Reply] = collections.deque()
        self.closed = False

    @classmethod
    def open(cls, config: SmtpConfig, *, implicit_tls: bool) -> Connection:
        timeout = config.timeouts.connect
        try:
            sock = socket.create_connection((config.host, config.port), timeout=timeout)
        except TimeoutError as exc:
            raise StageTimeout(
                f"could not connect to {config.host}:{config.port} within {timeout:g}s", stage=Stage.CONNECT
            ) from exc
        except OSError as exc:
            raise ConnectError(
                f"could not connect to {config.host}:{config.port}: {exc.strerror or exc}",
                stage=Stage.CONNECT,
            ) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        connection = cls(sock, config)
        if implicit_tls:
            try:
                connection.start_tls()
            except BaseException:
                connection.close()
                raise
        return connection

    @property
    def tls_version(self) -> str | None:
        return self._sock.version() if isinstance(self._sock, ssl.SSLSocket) else None

    @property
    def is_tls(self) -> bool:
        return isinstance(self._sock, ssl.SSLSocket)

    def start_tls(self) -> None:
        """Wrap the socket in TLS, verifying the server's certificate and sending SNI.

        RFC 3207 §4.2: anything the server sent before the handshake is discarded, never read as a reply.
        """
        self._parser.clear()
        self._ready.clear()
        context = self._config.tls_context()
        self._sock.settimeout(self._config.timeouts.starttls)
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=self._config.host)
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(
                f"certificate of {self._config.host} did not verify: {exc.verify_message}",
                stage=Stage.TLS_HANDSHAKE,
            ) from exc
        except TimeoutError as exc:
            raise StageTimeout("TLS handshake did not finish in time", stage=Stage.TLS_HANDSHAKE) from exc
        except (ssl.SSLError, OSError) as exc:
            raise TlsError(f"TLS handshake failed: {exc}", stage=Stage.TLS_HANDSHAKE) from exc

    def send(self, payload: bytes, stage: Stage) -> None:
        self._sock.settimeout(self._config.timeouts.for_stage(stage))
        with map_os_errors(stage):
            self._sock.sendall(payload)

    def send_data(self, payload: bytes) -> None:
        """Send message data block by block; each block has its own deadline (RFC 5321 §4.5.3.2.5)."""
        self._sock.settimeout(self._config.timeouts.data_block)
        view = memoryview(payload)
        with map_os_errors(Stage.DATA_BLOCK):
            for start in range(0, len(view), DATA_BLOCK_SIZE):
                self._sock.sendall(view[start : start + DATA_BLOCK_SIZE])

    def read_reply(self, stage: Stage) -> Reply:
        """The next whole reply, waiting at most the stage's deadline for all of it."""
        if self._ready:
            return self._ready.popleft()
        deadline = time.monotonic() + self._config.timeouts.for_stage(stage)
        while not self._ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StageTimeout(f"no complete reply within the {stage.value} deadline", stage=stage)
            self._sock.settimeout(remaining)
            with map_os_errors(stage):
                chunk = self._sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionLost("the server closed the connection", stage=stage)
            try:
                self._ready.extend(self._parser.feed(chunk))
            except ProtocolError as exc:
                raise ProtocolError(exc.message, stage=stage) from exc
        return self._ready.popleft()

    def has_unread_input(self) -> bool:
        """True if the server sent something (or hung up) while we were not waiting for a reply."""
        if self._ready or self._parser.pending:
            return True
        if isinstance(self._sock, ssl.SSLSocket) and self._sock.pending():
            return True
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def interrupt(self) -> None:
        """Wake a read or write blocked on this connection in another thread (it sees the connection
        lost); the owner closes it. Shuts the TCP socket down under TLS too, leaving the TLS object alone."""
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._sock, socket.SHUT_RDWR)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
