"""Counting SMTP sink with CHUNKING (RFC 3030 ``BDAT``) and PIPELINING, in its own process.

aiosmtpd has no ``BDAT``, so this is a small hand-written asyncio ``Protocol``. Same interface as
:mod:`bench.sink`: ``python -m bench.chunking_sink [--host 127.0.0.1] [--port 0]`` prints
``{"ready": true, "port": N}`` and then answers ``stats`` / ``reset`` lines on stdin (EOF stops it).

What it speaks (accepts everything, keeps only counts):

- EHLO advertises ``PIPELINING``, ``CHUNKING``, ``8BITMIME``, ``SIZE``, ``ENHANCEDSTATUSCODES``,
  ``SMTPUTF8``; HELO, MAIL, RCPT, RSET, NOOP, QUIT; unknown verbs get 500.
- ``DATA`` → 354, then lines up to a lone ``.``; a message counts when its final ``250`` is sent.
- ``BDAT <n> [LAST]`` → exactly n octets follow the command line (possibly in the same segment as
  the envelope, as a pipelining client sends it); each chunk gets its own reply, the ``LAST`` one
  completes the message. A chunk without a valid envelope is still consumed (RFC 3030 §2: the octets
  are read before the reply), then refused with 503; ``DATA`` after a ``BDAT`` is refused.
- Replies to every command found in one read are written back with one ``write`` (pipelined groups
  get their replies in one segment, as real servers do).

Bounded: a command line longer than 4 KiB without CRLF closes the connection with 500.
"""

from __future__ import annotations

import argparse
import asyncio
import enum
import time

from bench.sink import SinkStats, control_loop

MAX_LINE = 4096
MAX_SIZE = 50 * 1024 * 1024
HOSTNAME = b"chunking-sink.bench.invalid"
EHLO_REPLY = b"".join([
    b"250-" + HOSTNAME + b"\r\n",
    b"250-PIPELINING\r\n",
    b"250-CHUNKING\r\n",
    b"250-8BITMIME\r\n",
    b"250-SIZE " + str(MAX_SIZE).encode() + b"\r\n",
    b"250-ENHANCEDSTATUSCODES\r\n",
    b"250 SMTPUTF8\r\n",
])


class Mode(enum.Enum):
    COMMAND = 1
    DATA = 2  # after 354: lines until "."
    BDAT = 3  # reading the octets of one chunk


class Counter:
    """Shared by every connection of one sink; ``stats`` is replaced by ``reset``."""

    def __init__(self) -> None:
        self.stats = SinkStats()

    def message(self, rcpts: int, size: int) -> None:
        now = time.monotonic()
        stats = self.stats
        stats.messages += 1
        stats.rcpts += rcpts
        stats.bytes += size
        if stats.first_ts is None:
            stats.first_ts = now
        stats.last_ts = now


class ChunkingSMTP(asyncio.Protocol):
    """One SMTP connection. State: greeted?, envelope (mail, rcpts), and the reading mode."""

    def __init__(self, counter: Counter) -> None:
        self.counter = counter
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.mode = Mode.COMMAND
        self.greeted = False
        self.mail = False
        self.rcpts = 0
        self.size = 0  # octets of the current message so far
        self.chunking = False  # a BDAT has been seen in this transaction
        self.chunk_left = 0
        self.chunk_last = False
        self.chunk_error: bytes | None = None  # reply owed once a refused chunk has been consumed
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.counter.stats.connections += 1
        transport.write(b"220 " + HOSTNAME + b" ESMTP bench chunking sink\r\n")

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        self.buf += data
        out: list[bytes] = []
        while self.buf and not self.closing and self._step(out):
            pass
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.closing and self.transport is not None:
            self.transport.close()

    # --- parsing ----------------------------------------------------------------------------------

    def _step(self, out: list[bytes]) -> bool:
        """Consume one unit (a command line, a data line, or chunk octets); False = need more bytes."""
        if self.mode is Mode.BDAT:
            return self._chunk_octets(out)
        end = self.buf.find(b"\r\n")
        if end < 0:
            if len(self.buf) > MAX_LINE and self.mode is Mode.COMMAND:
                out.append(b"500 5.5.6 line too long\r\n")
                self.closing = True
            return False
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        if self.mode is Mode.DATA:
            self._data_line(line, out)
        else:
            self._command(line, out)
        return True

    def _data_line(self, line: bytes, out: list[bytes]) -> None:
        if line == b".":
            self.mode = Mode.COMMAND
            self.counter.message(self.rcpts, self.size)
            self._reset()
            out.append(b"250 2.0.0 OK queued\r\n")
        else:
            self.size += len(line) + 2 - (1 if line.startswith(b"..") else 0)

    def _chunk_octets(self, out: list[bytes]) -> bool:
        take = min(self.chunk_left, len(self.buf))
        del self.buf[:take]
        self.chunk_left -= take
        self.size += take
        if self.chunk_left:
            return False
        self.mode = Mode.COMMAND
        if self.chunk_error is not None:
            out.append(self.chunk_error)
            self.chunk_error = None
            self._reset()
        elif self.chunk_last:
            self.counter.message(self.rcpts, self.size)
            out.append(b"250 2.0.0 OK queued (" + str(self.size).encode() + b" octets)\r\n")
            self._reset()
        else:
            out.append(b"250 2.0.0 " + str(take).encode() + b" octets received\r\n")
        return True

    def _reset(self) -> None:
        self.mail = False
        self.rcpts = 0
        self.size = 0
        self.chunking = False

    # --- commands ---------------------------------------------------------------------------------

    def _command(self, line: bytes, out: list[bytes]) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if verb == b"EHLO":
            self.counter.stats.ehlo += 1
            self.greeted = True
            self._reset()
            out.append(EHLO_REPLY)
        elif verb == b"HELO":
            self.counter.stats.ehlo += 1
            self.greeted = True
            self._reset()
            out.append(b"250 " + HOSTNAME + b"\r\n")
        elif verb == b"MAIL":
            if not self.greeted or self.mail:
                out.append(b"503 5.5.1 bad sequence of commands\r\n")
            else:
                self.mail = True
                out.append(b"250 2.1.0 sender OK\r\n")
        elif verb == b"RCPT":
            if not self.mail:
                out.append(b"503 5.5.1 need MAIL first\r\n")
            else:
                self.rcpts += 1
                out.append(b"250 2.1.5 recipient OK\r\n")
        elif verb == b"DATA":
            if not self.rcpts or self.chunking:
                out.append(b"503 5.5.1 bad sequence of commands\r\n")
            else:
                self.mode = Mode.DATA
                out.append(b"354 end data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"BDAT":
            self._bdat(arg, out)
        elif verb == b"RSET":
            self._reset()
            out.append(b"250 2.0.0 OK\r\n")
        elif verb == b"NOOP":
            out.append(b"250 2.0.0 OK\r\n")
        elif verb == b"QUIT":
            self.counter.stats.quit += 1
            out.append(b"221 2.0.0 bye\r\n")
            self.closing = True
        else:
            out.append(b"500 5.5.2 command not recognised\r\n")

    def _bdat(self, arg: bytes, out: list[bytes]) -> None:
        parts = arg.split()
        if not parts or not parts[0].isdigit() or len(parts) > 2 or (
            len(parts) == 2 and parts[1].upper() != b"LAST"
        ):
            out.append(b"501 5.5.4 syntax: BDAT <size> [LAST]\r\n")
            self._reset()  # the size is unknown: nothing to skip, the transaction is over
            return
        self.chunk_left = int(parts[0])
        self.chunk_last = len(parts) == 2
        self.chunking = True
        if not self.rcpts:
            self.chunk_error = b"503 5.5.1 no valid recipients\r\n"
        elif self.size + self.chunk_left > MAX_SIZE:
            self.chunk_error = b"552 5.3.4 message too big\r\n"
        self.mode = Mode.BDAT
        if self.chunk_left == 0:  # "BDAT 0 LAST" ends the message with no octets
            self._chunk_octets(out)


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    counter = Counter()
    server = await loop.create_server(lambda: ChunkingSMTP(counter), host, port)
    await control_loop(counter, server.sockets[0].getsockname()[1])
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
