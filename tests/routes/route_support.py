"""Helpers for the route tests: worker processes (``python worker.py``), mails, per-second counts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
_OWN = ("DISPATCH_", "SMTP_URL", "REDIS_URL")


def route_url(port: int, **options: Any) -> str:
    """A plain loopback route with short deadlines plus route options, e.g. ``rate=20``."""
    query = {"tls": "off", "timeout": "5", **{k: str(v) for k, v in options.items()}}
    return f"smtp://127.0.0.1:{port}?" + "&".join(f"{k}={v}" for k, v in query.items())


def mails(count: int, tag: str) -> list[dict[str, Any]]:
    return [
        {"from": "sender@routes.test", "to": [f"user{i}@{tag}.test"], "subject": f"{tag} {i}", "text": "hi\n"}
        for i in range(count)
    ]


def per_second(times: Iterable[float]) -> Counter[int]:
    return Counter(int(t) for t in times)


def busiest_window(times: Iterable[float], width: float = 1.0) -> int:
    """The most arrivals in any window of ``width`` seconds (sliding, not aligned to whole seconds)."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= width:
            start += 1
        best = max(best, end - start + 1)
    return best


class Workers:
    """``python worker.py --concurrency N`` with its log; stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(self, env: Mapping[str, str], concurrency: int, log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        base = {k: v for k, v in os.environ.items() if not k.startswith(_OWN)}
        settings = {"DISPATCH_RETRY_BASE": "0.05", "DISPATCH_RETRY_MAX_DELAY": "0.2",
                    "DISPATCH_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1", **env}  # fmt: skip
        self.proc = subprocess.Popen(
            [sys.executable, "worker.py", "--concurrency", str(concurrency)], cwd=ROOT,
            env={**base, **settings}, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.known: set[int] = set()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict) and (name is None or value.get("event") == name):
                    out.append(value)
        return out

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def remember(self) -> None:
        """Note the pool's live descendants (worker processes, rq's scheduler) so ``stop`` can end them."""
        if self.proc.poll() is not None:
            return
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
                    children.setdefault(ppid, []).append(int(entry.name))
        todo = [self.proc.pid]
        while todo:
            for child in children.get(todo.pop(), []):
                self.known.add(child)
                todo.append(child)

    def stop(self) -> None:
        """SIGTERM the pool (it passes the signal on), wait, then SIGKILL whatever is left of it."""
        self.remember()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for pid in self.known:
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
                if state != "Z":
                    os.kill(pid, signal.SIGKILL)
        self._log.close()
