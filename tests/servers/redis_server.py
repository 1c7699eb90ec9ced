"""RedisServer: a private ``redis-server`` subprocess on a free 127.0.0.1 port for tests.

Never the machine's Redis: the port is picked from the ephemeral range (6379 is refused outright) and the
data directory is private. No persistence by default (``--save '' --appendonly no``); ``appendonly=True``
plus a fixed ``data_dir`` lets ``restart()`` prove that data survives a restart on the same port
(``appendfsync`` = ``everysec``, Redis's default, or ``always``). ``restart(kill=True)`` crashes it with
SIGKILL instead of shutting it down; ``restart(while_down=f)`` calls ``f`` while it is gone (an outage).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

DEFAULT_EXECUTABLE = shutil.which("redis-server") or "/usr/bin/redis-server"
_MACHINE_REDIS_PORT = 6379


def _pick_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class RedisServer:
    """Start with ``start()`` (or ``with``); ``url`` / ``client()`` once it answers PING."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        data_dir: Path | None = None,
        executable: str = DEFAULT_EXECUTABLE,
        start_timeout: float = 10.0,
    ) -> None:
        if port == _MACHINE_REDIS_PORT:
            raise ValueError("refusing port 6379: that is the machine's Redis, tests use a private one")
        self._fixed_port = port
        self.port = port or 0
        self.appendonly = appendonly
        if appendfsync not in ("everysec", "always", "no"):
            raise ValueError(f"appendfsync must be everysec, always or no, not {appendfsync!r}")
        self.appendfsync = appendfsync
        self._own_dir = data_dir is None
        self.data_dir = Path(tempfile.mkdtemp(prefix="test-redis-")) if data_dir is None else Path(data_dir)
        self.executable = executable
        self.start_timeout = start_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=0, socket_timeout=5)

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self) -> None:
        """Spawn redis-server and wait until it answers PING; a port lost to a race is retried."""
        if self.process is not None:
            raise RuntimeError("redis-server already running")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        attempts = 1 if self._fixed_port else 5
        for attempt in range(attempts):
            if not self._fixed_port:
                self.port = _pick_port()
            if self._spawn_and_wait():
                return
            if attempt == attempts - 1:
                break
        log_tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RuntimeError(f"redis-server did not answer PING on port {self.port}:\n{log_tail}")

    def _spawn_and_wait(self) -> bool:
        args = [
            self.executable,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--dir", str(self.data_dir),
            "--logfile", str(self.log_path),
            "--daemonize", "no",
        ]  # fmt: skip
        process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.process = process
        deadline = time.monotonic() + self.start_timeout
        client = self.client()
        try:
            while time.monotonic() < deadline:
                if process.poll() is not None:  # e.g. the port was taken between pick and bind
                    self.process = None
                    return False
                try:
                    if client.ping():
                        return True
                except redis.ConnectionError:
                    pass
                time.sleep(0.01)  # polling with a deadline, not a race
        finally:
            client.close()
        self._terminate()
        return False

    def stop(self) -> None:
        """Shut redis-server down (SIGTERM: it flushes the AOF) and wait for it; keeps port and dir."""
        self._terminate()

    def aof_file(self) -> Path:
        """The AOF file Redis appends to now (Redis 7: the last ``incr`` file of ``appendonlydir``)."""
        manifest = (self.data_dir / "appendonlydir" / "appendonly.aof.manifest").read_text().split("\n")
        names = [line.split()[1] for line in manifest if line.endswith(" type i")]
        return self.data_dir / "appendonlydir" / names[-1]

    def kill(self) -> None:
        """Crash redis-server (SIGKILL: no shutdown, no AOF flush beyond what ``appendfsync`` did)."""
        self._terminate(kill=True)

    def _terminate(self, *, kill: bool = False) -> None:
        process, self.process = self.process, None
        if process is None:
            return
        if kill:
            process.kill()
        else:
            process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self, *, kill: bool = False, while_down: Callable[[], object] | None = None) -> None:
        """Stop (SIGTERM, or SIGKILL with ``kill``) and start again on the same port with the same data
        directory; ``while_down`` is called in between."""
        self._terminate(kill=kill)
        if while_down is not None:
            while_down()
        fixed, self._fixed_port = self._fixed_port, self.port
        try:
            self.start()
        finally:
            self._fixed_port = fixed

    def close(self) -> None:
        """Stop and remove the data directory if this object created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
