"""Counting SMTP sink (aiosmtpd) that runs in its own process.

Run as ``python -m bench.sink [--host 127.0.0.1] [--port 0]``. It prints one JSON line
``{"ready": true, "port": N}`` on stdout, then answers each command line on stdin with one JSON line:

- ``stats``  -> counters (messages, connections, ehlo, quit, rcpts, bytes) and ``first_ts`` / ``last_ts``,
  the ``time.monotonic()`` of the first and last accepted message (CLOCK_MONOTONIC is system-wide on
  Linux, so the harness can compare them with its own clock);
- ``reset``  -> zeroes everything and answers ``{"ok": true}``.

EOF on stdin stops it. A subprocess keeps the sink's CPU off the measured worker and off the harness.
aiosmtpd does not advertise PIPELINING; it does read pipelined commands correctly (one line at a
time from a stream), so ``handle_EHLO`` adds the keyword to make pipelining clients use it.

:class:`SinkProcess` is the harness-side handle (also for :mod:`bench.chunking_sink`, which adds
CHUNKING/BDAT; it reuses :func:`control_loop`). Postfix as a further sink is not implemented: it would
need a private instance with its own config dir and a ``discard`` transport, and counting via its log.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import IO, Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass
class SinkStats:
    messages: int = 0
    connections: int = 0
    ehlo: int = 0
    quit: int = 0
    rcpts: int = 0
    bytes: int = 0
    first_ts: float | None = None
    last_ts: float | None = None


class CountingHandler:
    """aiosmtpd handler: accept everything, remember nothing but counts."""

    def __init__(self) -> None:
        self.stats = SinkStats()

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        self.stats.ehlo += 1
        session.host_name = hostname
        return [responses[0], "250-PIPELINING", *responses[1:]]

    async def handle_QUIT(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.stats.quit += 1
        return "221 Bye"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        now = time.monotonic()
        stats = self.stats
        stats.messages += 1
        stats.rcpts += len(envelope.rcpt_tos)
        stats.bytes += len(envelope.content or b"")
        if stats.first_ts is None:
            stats.first_ts = now
        stats.last_ts = now
        return "250 2.0.0 OK queued"


class CountingSMTP(SMTP):
    def __init__(self, handler: CountingHandler, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._counting = handler

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._counting.stats.connections += 1
        super().connection_made(transport)


class HasStats(Protocol):
    stats: SinkStats


async def control_loop(owner: HasStats, port: int) -> None:
    """Announce ``port``, then answer ``stats`` / ``reset`` lines on stdin until EOF (shared by sinks)."""
    loop = asyncio.get_running_loop()
    _emit({"ready": True, "port": port})
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        command = line.decode().strip()
        if command == "stats":
            _emit(asdict(owner.stats))
        elif command == "reset":
            owner.stats = SinkStats()
            _emit({"ok": True})
        elif command:
            _emit({"error": f"unknown command {command!r}"})


async def _serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    handler = CountingHandler()
    server = await loop.create_server(
        lambda: CountingSMTP(handler, hostname="sink.bench.invalid", loop=loop), host, port
    )
    await control_loop(handler, server.sockets[0].getsockname()[1])
    server.close()


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class SinkProcess:
    """Start ``python -m <module>`` (a sink) as a child and talk to it over its stdin/stdout."""

    def __init__(
        self, host: str = "127.0.0.1", log: IO[bytes] | None = None, module: str = "bench.sink"
    ) -> None:
        self.host = host
        self.module = module
        self.port = 0
        self._log = log
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> SinkProcess:
        self._proc = subprocess.Popen(
            [sys.executable, "-m", self.module, "--host", self.host, "--port", "0"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.DEVNULL,
            text=True,
        )
        ready = self._read()
        if not ready.get("ready"):
            raise RuntimeError(f"sink {self.module} did not start: {ready}")
        self.port = int(ready["port"])
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stats(self) -> SinkStats:
        return SinkStats(**self._ask("stats"))

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        proc = self._proc
        if proc is None:
            return
        self._proc = None
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def __enter__(self) -> SinkProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _ask(self, command: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(command + "\n")
        self._proc.stdin.flush()
        return self._read()

    def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            raise RuntimeError(f"sink exited (rc={self._proc.poll()})")
        result: dict[str, Any] = json.loads(line)
        return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
