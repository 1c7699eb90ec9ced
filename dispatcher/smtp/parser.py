"""The incremental, sans-IO reply parser: bytes in, complete ``Reply`` values out.

It never touches a socket and never assumes one read holds one reply: a read may end in the middle of a
line, or carry several replies at once (pipelining, RFC 2920). It is tested by feeding every sample
whole, one byte at a time, and glued to the start of the next reply.
"""

from __future__ import annotations

from typing import NoReturn

from dispatcher.errors import ProtocolError
from dispatcher.smtp.replies import MAX_CODE, MIN_CODE, Reply

_EXCERPT_BYTES = 80


def _excerpt(data: bytes | bytearray) -> str:
    shown = repr(bytes(data[:_EXCERPT_BYTES]))
    return shown + "..." if len(data) > _EXCERPT_BYTES else shown


class ReplyParser:
    """Turns the server's byte stream into ``Reply`` values.

    ``max_line_length`` counts a line with its line ending (RFC 5321 allows 512; real servers send
    longer). A line that cannot fit is refused as soon as that many bytes are buffered without a newline,
    so a server that never sends one cannot make us buffer without bound. Any error is final: the stream
    position is lost, so later ``feed`` calls raise the same ``ProtocolError``.
    """

    def __init__(self, *, max_line_length: int = 4096, max_lines: int = 512) -> None:
        if max_line_length < 5 or max_lines < 1:
            raise ValueError("max_line_length must be >= 5 and max_lines >= 1")
        self._max_line_length = max_line_length
        self._max_lines = max_lines
        self._buffer = bytearray()
        self._scanned = 0
        self._code: int | None = None
        self._lines: list[str] = []
        self._error: str | None = None

    @property
    def pending(self) -> bool:
        """True while bytes of an unfinished reply (or an error not yet raised) are held."""
        return bool(self._buffer) or bool(self._lines) or self._error is not None

    def clear(self) -> None:
        """Forget buffered bytes and any partial reply: after STARTTLS nothing sent in plaintext may
        be carried into the TLS session (RFC 3207 §4.2)."""
        self._buffer.clear()
        self._scanned = 0
        self._code = None
        self._lines = []

    def feed(self, data: bytes) -> list[Reply]:
        """Add ``data``; return every reply it completes, in order (maybe none).

        Replies completed before a malformed line in the same chunk are returned; the error is raised on
        the next call (a 250 followed by garbage in one packet still counts as accepted).
        """
        if self._error is not None:
            raise ProtocolError(self._error)
        self._buffer += data
        replies: list[Reply] = []
        try:
            self._parse(replies)
        except ProtocolError:
            if not replies:
                raise
        return replies

    def _parse(self, replies: list[Reply]) -> None:
        while True:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                if len(self._buffer) >= self._max_line_length:
                    self._fail(
                        f"reply line longer than {self._max_line_length} bytes: {_excerpt(self._buffer)}"
                    )
                return
            raw = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            self._scanned = 0
            reply = self._take_line(raw)
            if reply is not None:
                replies.append(reply)

    def _take_line(self, raw: bytes) -> Reply | None:
        if len(raw) > self._max_line_length:
            self._fail(f"reply line longer than {self._max_line_length} bytes: {_excerpt(raw)}")
        line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        head = line[:3]
        if len(head) < 3 or not head.isdigit() or not MIN_CODE <= int(head) <= MAX_CODE:
            self._fail(f"reply line does not start with a code 200..599: {_excerpt(raw)}")
        separator = line[3:4]
        if separator not in (b"", b" ", b"-"):
            self._fail(f"reply code not followed by space, dash or line end: {_excerpt(raw)}")
        body = line[4:]
        if b"\r" in body:
            self._fail(f"bare CR inside a reply line: {_excerpt(raw)}")
        code = int(head)
        if self._code is None:
            self._code = code
        elif code != self._code:
            self._fail(f"continuation line code {code} differs from {self._code}: {_excerpt(raw)}")
        if len(self._lines) >= self._max_lines:
            self._fail(f"reply has more than {self._max_lines} lines: {_excerpt(raw)}")
        self._lines.append(body.decode("utf-8", errors="replace"))
        if separator == b"-":
            return None
        reply = Reply(code, tuple(self._lines))
        self._code = None
        self._lines = []
        return reply

    def _fail(self, message: str) -> NoReturn:
        self._error = message
        self._buffer.clear()
        self._lines = []
        raise ProtocolError(message)
