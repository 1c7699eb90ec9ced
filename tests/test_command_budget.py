"""What one delivered mail costs Redis, counted (issue 15): a batch of ``JOB_BATCH_SIZE`` mails delivered by
``worker.py --burst`` against the fixture's private Redis, every command read from ``MONITOR``.

Commands the worker sends (what redis-py packs and parses) are counted apart from those a script runs
inside Redis (MONITOR tags them ``lua``). A burst over an empty queue is counted first and taken off, so
the count is what the mails cost: their attempts and their one rq job, not the worker's start and stop.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import redis
from servers.recording import RecordingSmtpServer

from dispatcher.queue.producer import JOB_BATCH_SIZE, Producer

ROOT = Path(__file__).resolve().parent.parent
END = b"command-budget-end"
CLIENT_BUDGET = 15
"""Commands the worker sends per delivered mail (issue 15's target; 20 before its Lua outcome script)."""
TOTAL_BUDGET = 17
"""Commands Redis runs per delivered mail, inside scripts too: 16.85 measured (issue 15 aims at 15; 29
before the outcome script, 27 before the key layout lost the overall and ``sending`` indexes, the source
key, the per-minute counters and final records' TTLs)."""


class CommandCounter:
    """Counts the commands Redis runs while inside: ``client`` (sent) and ``lua`` (run by scripts)."""

    def __init__(self, url: str) -> None:
        self.client: Counter[str] = Counter()
        self.lua: Counter[str] = Counter()
        self._redis = redis.Redis.from_url(url)
        self._monitor = self._redis.monitor()  # type: ignore[no-untyped-call]
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> CommandCounter:
        self._monitor.__enter__()  # MONITOR is on once this returns
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._redis.echo(END)
        self._thread.join(timeout=30)
        self._monitor.__exit__(None, None, None)
        self._redis.close()
        assert not self._thread.is_alive(), "MONITOR never showed the end mark"

    def _read(self) -> None:
        while True:
            line = self._monitor.connection.read_response()
            if not isinstance(line, bytes) or b"] " not in line:
                continue
            head, _, command = line.partition(b"] ")
            if END in command:
                return
            name = command.split(b" ", 1)[0].strip(b'"').upper().decode()
            (self.lua if head.endswith(b" lua") else self.client)[name] += 1


def burst(redis_url: str, port: int) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "SMTP_URL": f"smtp://127.0.0.1:{port}?tls=off"}
    done = subprocess.run([sys.executable, "worker.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def test_a_delivered_mail_costs_at_most_the_budget_of_redis_commands(
    redis_url: str, smtp_server: Callable[..., RecordingSmtpServer]
) -> None:
    sink = smtp_server()
    with CommandCounter(redis_url) as idle:
        burst(redis_url, sink.port)
    mails = [{"from": "app@example.com", "to": f"user{i}@example.org", "subject": f"budget {i}", "text": "hi"}
             for i in range(JOB_BATCH_SIZE)]  # fmt: skip
    Producer(redis.Redis.from_url(redis_url)).enqueue_many(mails)
    with CommandCounter(redis_url) as busy:
        burst(redis_url, sink.port)
    assert len(sink.messages) == JOB_BATCH_SIZE
    client = (busy.client.total() - idle.client.total()) / JOB_BATCH_SIZE
    total = client + (busy.lua.total() - idle.lua.total()) / JOB_BATCH_SIZE
    sent = dict((busy.client - idle.client).most_common())
    assert client <= CLIENT_BUDGET, f"{client:.2f} commands sent per mail: {sent}"
    assert total <= TOTAL_BUDGET, f"{total:.2f} commands run per mail: {sent}, in scripts {dict(busy.lua)}"
