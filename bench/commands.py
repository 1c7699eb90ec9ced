"""Redis commands per delivered mail, counted with ``MONITOR`` on the bench's private Redis.

MONITOR makes Redis write every command it runs to the monitoring connection, which slows it down: the
harness therefore counts in a **separate, untimed pass** (``Lab.count_commands``), never during a timed
drain. Every contender is counted the same way, whatever its client library: a line of MONITOR output is

    +1796143753.611037 [0 127.0.0.1:50512] "SET" "a" "1"      <- sent by a client
    +1796143753.611504 [0 lua] "set" "b" "x"                  <- run inside a Lua script (EVAL/EVALSHA/FCALL)

so the commands clients sent (MULTI, EXEC and EVALSHA included: each is a command the client sent and
Redis parsed) and the commands scripts ran are counted apart. The pass starts after the queue is filled
and ends with a marker (``ECHO``) once the workers have exited, so neither the fill nor the harness's
own checks afterwards are counted.
"""

from __future__ import annotations

import socket
import threading
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import IO, Any

SOURCE_CLIENT = "client"
SOURCE_LUA = "lua"
STOP_TIMEOUT_S = 30.0


def parse_monitor_line(line: bytes) -> tuple[str, str] | None:
    """``(source, COMMAND)`` of one MONITOR line (source ``client`` or ``lua``); None for anything else."""
    if not line.startswith(b"+") or b" [" not in line:
        return None
    head, sep, rest = line.partition(b"] ")
    if not sep:
        return None
    where = head.rsplit(b" [", 1)[-1].split(b" ", 1)  # [db source]
    if len(where) != 2 or not rest.startswith(b'"'):
        return None
    name = rest[1:].split(b'"', 1)[0].decode("ascii", "replace").upper()
    return (SOURCE_LUA if where[1] == b"lua" else SOURCE_CLIENT), name


@dataclass
class CommandCount:
    """Commands seen between ``start()`` and ``stop()``, by source and by name."""

    client: int = 0
    lua: int = 0
    by_name: Counter[str] = field(default_factory=Counter)  # "EVALSHA", "lua:HSET", ...

    def add(self, source: str, name: str) -> None:
        if source == SOURCE_LUA:
            self.lua += 1
            self.by_name["lua:" + name] += 1
        else:
            self.client += 1
            self.by_name[name] += 1

    def top(self, n: int = 12) -> dict[str, int]:
        return dict(self.by_name.most_common(n))


class MonitorCounter:
    """A MONITOR connection to ``host:port`` read by a thread; ``stop()`` returns the count so far.

    ``stop()`` sends a unique ``ECHO`` marker over a second connection and reads until MONITOR shows
    it, so every command Redis ran before the marker is counted (and the marker is not).
    """

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.count = CommandCount()
        self._marker = f"bench-monitor-end-{uuid.uuid4().hex}"
        self._seen_marker = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self.error = ""

    def start(self) -> MonitorCounter:
        sock = socket.create_connection((self.host, self.port), timeout=STOP_TIMEOUT_S)
        sock.sendall(b"MONITOR\r\n")
        reader = sock.makefile("rb")
        if reader.readline().strip() != b"+OK":
            sock.close()
            raise RuntimeError("redis refused MONITOR")
        sock.settimeout(None)  # a quiet spell is no error; stop() ends the read with its marker
        self._sock = sock
        self._thread = threading.Thread(target=self._read, args=(reader,), name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def _read(self, reader: IO[bytes]) -> None:
        marker = self._marker.encode()
        try:
            for line in reader:
                parsed = parse_monitor_line(line)
                if parsed is None:
                    continue
                if parsed[1] == "ECHO" and marker in line:
                    self._seen_marker.set()
                    return
                self.count.add(*parsed)
        except OSError as exc:
            self.error = f"MONITOR connection: {exc}"
        finally:
            self._seen_marker.set()

    def stop(self) -> CommandCount:
        with socket.create_connection((self.host, self.port), timeout=STOP_TIMEOUT_S) as other:
            command = f"*2\r\n$4\r\nECHO\r\n${len(self._marker)}\r\n{self._marker}\r\n".encode()
            other.sendall(command)
            other.recv(1024)
        if not self._seen_marker.wait(STOP_TIMEOUT_S):
            self.error = self.error or f"MONITOR did not show the end marker within {STOP_TIMEOUT_S:.0f} s"
        if self._sock is not None:
            self._sock.close()
        if self._thread is not None:
            self._thread.join(5)
        return self.count

    def __enter__(self) -> MonitorCounter:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self._sock is not None:
            self._sock.close()


@dataclass
class CommandResult:
    """Redis commands the workers sent (``client``) and their Lua scripts ran (``lua``) in one untimed
    drain under MONITOR (:mod:`bench.commands`), divided by the mails delivered."""

    scenario: str
    workers: int
    messages: int
    delivered: int
    client: int
    lua: int
    client_per_mail: float | None
    lua_per_mail: float | None
    total_per_mail: float | None
    top: dict[str, int] = field(default_factory=dict)  # most frequent commands ("lua:HSET" inside scripts)
    ok: bool = True
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
