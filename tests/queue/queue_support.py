"""Helpers for the queue tests: worker processes, the enqueue CLI, a slow SMTP sink, a Redis dump.

Workers and the CLI run as real subprocesses from the project root (``python worker.py ...``) against the
private Redis of ``redis_url`` and DevSink servers on loopback. Every worker started here is stopped at
teardown: SIGTERM, a deadline, then SIGKILL of it and every process it left behind (found by parent pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import redis
from helpers import wait_until

from dispatcher.dev.devsink import DevSink, _SinkHandler

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
STOP_DEADLINE = 10.0


def smtp_url(port: int, *, user: str | None = None, password: str | None = None, query: str = "") -> str:
    """The plain loopback route URL of a DevSink (``tls=off``), optionally with credentials."""
    auth = f"{user}:{password}@" if user is not None else ""
    extra = f"&{query}" if query else ""
    return f"smtp://{auth}127.0.0.1:{port}?tls=off{extra}"


def base_env(redis_url: str, **extra: str) -> dict[str, str]:
    """The environment of a subprocess: ours without any dispatcher settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("SMTP_URL", "DISPATCH_")) or k == "REDIS_URL")
    }
    env.update(
        REDIS_URL=redis_url, DISPATCH_LOG_FORMAT="json", DISPATCH_LOG_LEVEL="INFO", PYTHONUNBUFFERED="1"
    )
    env.update(extra)
    return env


def _children_of(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # pid (comm) state ppid ...; comm may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in _children_of(todo.pop()):
            out.append(child)
            todo.append(child)
    return out


class WorkerRun:
    """One ``python worker.py ...`` subprocess; its stderr (JSON log lines) goes to ``log_path``."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [PYTHON, "worker.py", *self.args],
            cwd=ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )
        self.known_pids: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def events(self) -> list[dict[str, Any]]:
        """Every complete JSON log line so far (other lines are ignored here; see ``raw_lines``)."""
        out: list[dict[str, Any]] = []
        for line in self.text().splitlines():
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out

    def raw_lines(self) -> list[str]:
        """Lines of the log that are not JSON objects (tracebacks, prints)."""
        out = []
        for line in self.text().splitlines():
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok and line.strip():
                out.append(line)
        return out

    def has_event(self, name: str) -> bool:
        return any(e.get("event") == name for e in self.events())

    def wait_for_event(self, predicate: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and not any(predicate(e) for e in self.events()):
                raise AssertionError(f"worker exited ({self.proc.returncode}) before {what}:\n{self.text()}")
            self._remember_pids()
            return any(predicate(e) for e in self.events())

        wait_until(
            seen, timeout=timeout, interval=0.02, message=f"no {what} within {timeout}s:\n{self.text()}"
        )

    def wait(self, timeout: float) -> int:
        """Wait for the exit code; AssertionError (with the log) if it does not come in time."""
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            self._remember_pids()
            if time.monotonic() >= deadline:
                raise AssertionError(f"worker still running after {timeout}s:\n{self.text()}")
            time.sleep(0.02)
        return self.proc.returncode

    def _remember_pids(self) -> None:
        if self.proc.poll() is None:
            self.known_pids.update(descendants(self.proc.pid))

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self._remember_pids()
            self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_DEADLINE, then SIGKILL it and whatever it left running."""
        try:
            self.terminate()
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self._remember_pids()
                self.proc.kill()
                self.proc.wait(timeout=STOP_DEADLINE)
            # Pool children have their own sessions, rq's scheduler is a child process: none may outlive us.
            leftovers = [pid for pid in self.known_pids if _alive(pid)]
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_DEADLINE
            while any(_alive(pid) for pid in leftovers) and time.monotonic() < deadline:
                time.sleep(0.02)
            for pid in leftovers:
                if _alive(pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        finally:
            self._log.close()


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2 :].split()[0] != "Z"


def dump_redis(client: redis.Redis) -> dict[str, Any]:
    """Every key (SCAN) with its value read by type. Values that are zlib streams (rq's job ``data``) are
    kept both raw and decompressed, so a search sees what rq compressed."""
    out: dict[str, Any] = {}

    def expand(value: bytes) -> list[bytes]:
        try:
            return [value, zlib.decompress(value)]
        except zlib.error:
            return [value]

    for raw_key in client.scan_iter(count=1000):
        key = raw_key.decode("utf-8", "surrogateescape")
        kind = client.type(raw_key).decode()
        value: Any
        if kind == "string":
            value = expand(client.get(raw_key) or b"")
        elif kind == "hash":
            value = {k: expand(v) for k, v in client.hgetall(raw_key).items()}
        elif kind == "list":
            value = [expand(v) for v in client.lrange(raw_key, 0, -1)]
        elif kind == "set":
            value = [expand(v) for v in client.smembers(raw_key)]
        elif kind == "zset":
            value = [(expand(m), s) for m, s in client.zrange(raw_key, 0, -1, withscores=True)]
        elif kind == "stream":
            value = client.xrange(raw_key)
        else:
            value = f"<{kind}>"
        out[key] = (kind, value)
    return out


def dump_text(dump: Mapping[str, Any]) -> str:
    """The dump as one searchable string (bytes shown with repr and as decoded UTF-8)."""
    parts: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, bytes):
            parts.append(value.decode("utf-8", "replace"))
            parts.append(repr(value))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(k)
                walk(v)
        elif isinstance(value, list | tuple | set):
            for item in value:
                walk(item)
        else:
            parts.append(str(value))

    for key, value in dump.items():
        parts.append(key)
        walk(value)
    return "\n".join(parts)


class _GatedHandler(_SinkHandler):
    """DevSink's handler, but the reply to the final dot waits for ``sink.release`` (or its deadline)."""

    def __init__(self, sink: GatedSink) -> None:
        super().__init__(sink)
        self._gated = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._gated.data_arrived.set()
        deadline = time.monotonic() + self._gated.max_hold
        while not self._gated.release.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return await super().handle_DATA(server, session, envelope)


class GatedSink(DevSink):
    """A DevSink whose server is "slow" at the end of DATA: it holds the 250 until ``release`` is set."""

    def __init__(self, *, max_hold: float = 15.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.max_hold = max_hold
        self.data_arrived = threading.Event()
        self.release = threading.Event()

    def _make_protocol(self) -> Any:
        protocol = super()._make_protocol()
        handler = _GatedHandler(self)
        protocol.event_handler = handler
        protocol._handle_hooks["DATA"] = handler.handle_DATA
        return protocol


def queued_send_ids(client: redis.Redis, queue_name: str = "mail-default") -> list[str]:
    """The send ids the jobs waiting in an rq queue will deliver (a job carries one id or a batch)."""
    from rq import Queue
    from rq.serializers import JSONSerializer

    out: list[str] = []
    for job in Queue(queue_name, connection=client, serializer=JSONSerializer).get_jobs():
        arg = job.args[0]
        out.extend([arg] if isinstance(arg, str) else arg)
    return sorted(out)
