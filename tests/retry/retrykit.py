"""Helpers for the retry/crash-safety tests: worker subprocesses, CLI calls, server-side counting.

Workers always run as real processes (``python worker.py ...`` from the project root) and are stopped at
teardown: SIGTERM, wait with a deadline, then SIGKILL — their descendants too (rq forks a scheduler
process per worker that outlives a ``kill -9`` of its parent, so descendants are remembered while alive).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import redis

from dispatcher.delivery.jobs import Attempt
from dispatcher.queue.records import SendRecord
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
_OWN_PREFIXES = ("DISPATCH_", "SMTP_URL", "REDIS_URL")


def smtp_url(port: int, **options: Any) -> str:
    """``smtp://127.0.0.1:PORT?tls=off&...``: a plain loopback route with short, explicit deadlines."""
    query = {"tls": "off", "timeout": "5", **{k: str(v) for k, v in options.items()}}
    return f"smtp://127.0.0.1:{port}?" + "&".join(f"{k}={v}" for k, v in query.items())


def env_for(redis_url: str, smtp: str, **settings: Any) -> dict[str, str]:
    """The settings a worker (or ``load_settings``) reads, and nothing inherited that could override them."""
    env = {
        "REDIS_URL": redis_url,
        "SMTP_URL": smtp,
        "DISPATCH_RETRY_BASE": "0.05",
        "DISPATCH_RETRY_MAX_DELAY": "0.2",
        "DISPATCH_LOG_LEVEL": "INFO",
    }
    env.update({k: str(v) for k, v in settings.items()})
    return env


def process_env(settings: Mapping[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN_PREFIXES)}
    return {**base, "PYTHONUNBUFFERED": "1", **settings}


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[19]
    except (OSError, IndexError):
        return None


def alive(pid: int, started: str | None) -> bool:
    """``pid`` is still the very process we saw (same start time), and not a zombie."""
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z" and _start_time(pid) == started


class WorkerProcess:
    """One ``python worker.py ARGS`` subprocess with its log in ``log_path``."""

    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.args, self.log_path = args, log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [PYTHON, "worker.py", *args],
            cwd=ROOT,
            env=process_env(env),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self.known: dict[int, str | None] = {}

    @property
    def pid(self) -> int:
        return self.process.pid

    def remember_descendants(self) -> list[int]:
        """Note every live descendant (scheduler, pool children) so teardown can stop it by its pid."""
        tree = _children_map()
        found, todo = [], list(tree.get(self.pid, []))
        while todo:
            pid = todo.pop()
            found.append(pid)
            self.known.setdefault(pid, _start_time(pid))
            todo.extend(tree.get(pid, []))
        return found

    def children(self) -> list[int]:
        """The live pool children (worker processes) of this ``worker.py`` right now, remembered too."""
        self.remember_descendants()
        return sorted(p for p in _children_map().get(self.pid, []) if alive(p, self.known.get(p)))

    def log_text(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        self.remember_descendants()
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, deadline: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``deadline``, then SIGKILL; the same for every remembered descendant."""
        if self.process.poll() is None:
            self.remember_descendants()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=deadline)
            except subprocess.TimeoutExpired:
                self.remember_descendants()
                self.process.kill()
                self.process.wait(timeout=10)
        for pid, started in self.known.items():
            stop_pid(pid, started)
        self._log.close()
        return self.process.returncode


def stop_pid(pid: int, started: str | None, deadline: float = 5.0) -> None:
    if not alive(pid, started):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + deadline
    while alive(pid, started) and time.monotonic() < end:
        time.sleep(0.05)  # polling a process we signalled, with a deadline
    if alive(pid, started):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return


def run_cli(redis_url: str, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python enqueue.py --redis-url URL ARGS`` from the project root."""
    return subprocess.run(
        [PYTHON, "enqueue.py", "--redis-url", redis_url, *args],
        cwd=ROOT,
        env=process_env({}),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def cli_json(redis_url: str, *args: str) -> Any:
    done = run_cli(redis_url, *args)
    assert done.returncode == 0, f"enqueue.py {' '.join(args)} -> {done.returncode}: {done.stderr}"
    return json.loads(done.stdout)


def status(redis_url: str, send_id: str) -> dict[str, Any]:
    """What ``enqueue.py status ID`` prints, parsed."""
    result: dict[str, Any] = cli_json(redis_url, "status", send_id)
    return result


def load(connection: redis.Redis, send_id: str) -> SendRecord:
    rec = SendStore(connection).load(send_id)
    assert rec is not None, f"no record for {send_id}"
    return rec


def state_of(connection: redis.Redis, send_id: str) -> str | None:
    rec = SendStore(connection).load(send_id)
    return rec.state if rec else None


def attempts_made(rec: SendRecord) -> list[dict[str, Any]]:
    """The history entries that are delivery attempts (not retry requests or worker-loss notes)."""
    return [h for h in rec.status().get("history", []) if "event" not in h]


def mail(to: Iterable[str], subject: str = "retry test", **extra: Any) -> dict[str, Any]:
    return {"from": "sender@dispatch.test", "to": list(to), "subject": subject, "text": "hello\n", **extra}


class InProcess:
    """Run attempts of a send in this process: the job function with a real Runtime, no worker."""

    def __init__(self, connection: redis.Redis, settings_env: Mapping[str, str]) -> None:
        self.redis = connection
        self.runtime = Runtime(load_settings(dict(settings_env), need_routes=True), worker_name="in-process")

    def attempt(self, send_id: str) -> dict[str, Any]:
        """One attempt, as the rq job the record currently expects (the first job id is the send id)."""
        job_id = load(self.redis, send_id).rq_job or send_id
        return Attempt(self.runtime, self.redis, job_id, send_id).run()

    def close(self) -> None:
        self.runtime.close()


def message_id_of(data: bytes) -> str | None:
    value = BytesHeaderParser().parsebytes(data).get("Message-ID")
    return str(value).strip() if value else None


def deliveries(messages: Iterable[Any], *, only_final: bytes | None = None) -> Counter[tuple[str, str]]:
    """(Message-ID, recipient) → how many copies the server holds. ``messages`` from DevSink or the
    scripted server; ``only_final`` keeps scripted messages whose final reply starts with these bytes
    (``b"250"`` accepted; the empty prefix keeps any reply; see ``unanswered``)."""
    counts: Counter[tuple[str, str]] = Counter()
    for message in messages:
        if only_final is not None:
            final = getattr(message, "final_reply", None)
            if final is None or not final.startswith(only_final):
                continue
        mid = message_id_of(message.data)
        if mid is None:
            continue
        for rcpt in message.rcpt_tos:
            counts[(mid, rcpt.lower())] += 1
    return counts


def unanswered(messages: Iterable[Any]) -> Counter[tuple[str, str]]:
    """Scripted messages whose data arrived but whose final reply was never sent (drop / hang)."""
    counts: Counter[tuple[str, str]] = Counter()
    for message in messages:
        if message.final_reply is not None:
            continue
        mid = message_id_of(message.data)
        for rcpt in message.rcpt_tos if mid else ():
            counts[(mid, rcpt.lower())] += 1
    return counts


StartWorker = Callable[..., WorkerProcess]
