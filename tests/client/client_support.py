"""Helpers for the SMTP client tests: route URLs and a real TCP relay (cut on demand, optional TLS).

``Relay`` sits between the client and a test server on 127.0.0.1. ``cut()`` shuts every relayed
connection down, which is how a test makes "the server hung up while the client was idle" happen with
real sockets. With ``server_context`` it terminates TLS on accept, turning a plaintext server into an
implicit-TLS (``smtps://``) one.
"""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from pathlib import Path
from urllib.parse import quote


def url(
    port: int,
    *,
    scheme: str = "smtp",
    user: str | None = None,
    password: str | None = None,
    host: str = "127.0.0.1",
    **options: object,
) -> str:
    """``scheme://[user:password@]host:port?options``; ``tls=off`` and ``timeout=5`` unless given."""
    auth = ""
    if user is not None:
        auth = quote(user, safe="") + (":" + quote(password, safe="") if password is not None else "") + "@"
    defaults: dict[str, object] = {"timeout": 5, "ehlo_name": "client.test"}
    if scheme == "smtp":
        defaults["tls"] = "off"
    # ``timeout`` sets every stage, so it goes first and ``timeout_<stage>`` options after it win.
    merged = {**defaults, **options}
    ordered = sorted(merged.items(), key=lambda item: item[0] != "timeout")
    query = "&".join(f"{key}={_text(value)}" for key, value in ordered)
    return f"{scheme}://{auth}{host}:{port}?{query}"


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return quote(str(value), safe="/")
    return quote(str(value), safe="")


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


class Relay:
    """Forward connections on ``.port`` to ``target_port``; see the module docstring."""

    def __init__(self, target_port: int, server_context: ssl.SSLContext | None = None) -> None:
        self.target_port = target_port
        self.server_context = server_context
        self.accepted = 0
        self.handshake_errors: list[str] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    def __enter__(self) -> Relay:
        thread = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}", daemon=True)
        self._threads.append(thread)
        thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stopping.set()
        _shutdown(self._listener)
        self._listener.close()
        self.cut()
        for thread in list(self._threads):
            thread.join(timeout=5)

    def cut(self) -> None:
        """Shut down every relayed connection, both sides (the client sees EOF)."""
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    @property
    def open_connections(self) -> int:
        with self._lock:
            return len(self._sockets) // 2

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                down, _ = self._listener.accept()
            except OSError:
                return
            self.accepted += 1
            thread = threading.Thread(target=self._serve, args=(down,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, down: socket.socket) -> None:
        up: socket.socket | None = None
        try:
            if self.server_context is not None:
                down.settimeout(5)
                try:
                    down = self.server_context.wrap_socket(down, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self.handshake_errors.append(str(exc))
                    return
                down.settimeout(None)
            up = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            up.settimeout(None)
            with self._lock:
                self._sockets.update((down, up))
            self._pump(down, up)
        except OSError:
            pass
        finally:
            with self._lock:
                self._sockets.discard(down)
                if up is not None:
                    self._sockets.discard(up)
            for sock in (down, up):
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.close()

    def _pump(self, down: socket.socket, up: socket.socket) -> None:
        peers = {down: up, up: down}
        while not self._stopping.is_set():
            if isinstance(down, ssl.SSLSocket) and down.pending():
                readable = [down]
            else:
                readable, _, _ = select.select([down, up], [], [], 0.2)
            for sock in readable:
                data = sock.recv(65536)
                if not data:
                    return
                peers[sock].sendall(data)


class StallingServer:
    """A minimal SMTP server that stops reading once message data is due (after ``354`` or at ``BDAT``).

    The client's writes then block when the socket buffers are full: the only way to make the per-block
    data deadline fire (ScriptedSmtpServer keeps reading while it "hangs"). Lock-step replies, one
    connection at a time; ``stalled`` is set when it stopped reading.
    """

    def __init__(self, keywords: tuple[str, ...] = ("SIZE 200000000",)) -> None:
        self.keywords = keywords
        self.stalled = threading.Event()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, name=f"stalling-{self.port}", daemon=True)
        self._conn: socket.socket | None = None

    def __enter__(self) -> StallingServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        _shutdown(self._listener)
        self._listener.close()
        if self._conn is not None:
            _shutdown(self._conn)
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return
        self._conn = conn
        with conn:
            conn.sendall(b"220 stalling.test ESMTP\r\n")
            buffer = b""
            while not self._stop.is_set():
                while b"\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                line, _, buffer = buffer.partition(b"\n")
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb == b"EHLO":
                    names = ["stalling.test", *self.keywords]
                    conn.sendall(
                        b"".join(
                            f"250{'-' if i < len(names) - 1 else ' '}{n}\r\n".encode()
                            for i, n in enumerate(names)
                        )
                    )
                elif verb in (b"MAIL", b"RCPT"):
                    conn.sendall(b"250 ok\r\n")
                elif verb in (b"DATA", b"BDAT"):
                    if verb == b"DATA":
                        conn.sendall(b"354 go ahead\r\n")
                    self.stalled.set()
                    self._stop.wait()  # read nothing more: the client's send buffer fills up
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
