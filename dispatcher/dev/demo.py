"""``make demo``: the whole local stack doing real work, stopped cleanly by Ctrl-C.

Redis (``REDIS_URL`` when it is set and answers, else a private ``redis-server``), the development sink
(``dispatcher.dev.devsink``: stores .eml files; answers one address 450 once and another 550), two worker
processes, the dashboard, and a demo batch that exercises the interesting paths. It shows progress until
the batch settles, then prints where to look.
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import redis

from dispatcher.dev.devsink import DevSink, Rule
from dispatcher.logs import configure_logging
from dispatcher.queue.producer import Producer
from dispatcher.queue.states import FINAL_STATES
from dispatcher.queue.store import SendStore

SOFT = "soft-bounce@example.net"
HARD = "no-such-user@example.net"
DASHBOARD_PORT = 8025


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def demo_batch() -> list[dict[str, Any]]:
    """Mails that show the normal path, a retry, a permanent failure, an attachment and UTF-8."""
    run = secrets.token_hex(3)
    mails: list[dict[str, Any]] = [
        {"from": "Demo App <app@example.com>", "to": f"user{i}@example.org", "subject": f"Welcome #{i}",
         "text": f"Hello user {i},\nthis is mail {i} of the demo.\n", "key": f"demo-{run}-{i}"}
        for i in range(1, 21)
    ]  # fmt: skip
    mails.append({"from": "app@example.com", "to": SOFT, "subject": "Deferred once, then delivered",
                  "text": "The sink answers 450 to the first try.", "key": f"demo-{run}-soft"})  # fmt: skip
    mails.append({"from": "app@example.com", "to": HARD, "subject": "Refused with 550",
                  "text": "The sink refuses this recipient.", "key": f"demo-{run}-hard"})  # fmt: skip
    report = base64.b64encode(b"day,mails\nmon,42\ntue,17\n").decode()
    attachment = {"filename": "report.csv", "content_type": "text/csv", "content": report}
    mails.append({"from": "app@example.com", "to": "files@example.org", "subject": "Your report",
                  "text": "Report attached.", "html": "<p>Report <b>attached</b>.</p>",
                  "key": f"demo-{run}-att",
                  "attachments": [attachment]})  # fmt: skip
    mails.append({"from": "Zoë <app@example.com>", "to": "jürgen@example.org", "subject": "Grüße aus Köln",
                  "text": "Schöne Grüße!", "key": f"demo-{run}-utf8", "priority": "high"})  # fmt: skip
    return mails


class Stack:
    """Everything the demo started, so it can all be stopped."""

    def __init__(self, data_dir: Path, out: TextIO) -> None:
        self.data_dir = data_dir
        self.out = out
        self.processes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.sink: DevSink | None = None
        self.redis_url = ""

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def start_redis(self) -> None:
        url = os.environ.get("REDIS_URL")
        if url:
            try:
                redis.Redis.from_url(url, socket_connect_timeout=2).ping()
                self.redis_url = url
                self.say(f"redis      using REDIS_URL={url}")
                return
            except redis.RedisError as exc:
                self.say(
                    f"redis      REDIS_URL={url} does not answer ({exc}); starting a private redis-server"
                )
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit(
                "redis-server is not installed: run `make demo` (it installs it) or set REDIS_URL"
            )
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self._spawn("redis", [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(self.data_dir)])  # fmt: skip
        client = redis.Redis.from_url(self.redis_url)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        "the private redis-server did not start; see demo-data/logs/redis.log"
                    ) from None
                time.sleep(0.05)
        self.say(f"redis      private redis-server on {self.redis_url}")

    def start_sink(self) -> str:
        rules = {SOFT: Rule(450, "4.2.1 Mailbox busy, try again in 2 seconds", times=1),
                 HARD: Rule(550, "5.1.1 No such user here")}  # fmt: skip
        self.sink = DevSink(maildir=self.data_dir / "mail", rules=rules)
        self.sink.start()
        self.say(
            f"devsink    smtp://127.0.0.1:{self.sink.port}  storing .eml files in {self.data_dir / 'mail'}"
        )
        return f"smtp://127.0.0.1:{self.sink.port}?tls=off"

    def _spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> None:
        logs = self.data_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child for its lifetime
        process = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
        self.processes.append((name, process))

    def start_workers(self, smtp_url: str) -> None:
        env = {**os.environ, "REDIS_URL": self.redis_url, "SMTP_URL": smtp_url, "DISPATCH_RETRY_BASE": "2",
               "DISPATCH_LOG_FORMAT": "json"}  # fmt: skip
        self._spawn("worker", [sys.executable, "-m", "dispatcher.worker", "--concurrency", "2"], env)
        self.say(f"workers    2 processes, logs in {self.data_dir / 'logs' / 'worker.log'}")

    def start_dashboard(self, password: str) -> None:
        env = {**os.environ, "REDIS_URL": self.redis_url, "DISPATCH_DASHBOARD_USER": "demo",
               "DISPATCH_DASHBOARD_PASSWORD": password, "DISPATCH_API_TOKEN": password,
               "DISPATCH_LOG_FORMAT": "json"}  # fmt: skip
        command = [
            sys.executable,
            "-m",
            "dispatcher.dashboard",
            "--host",
            "127.0.0.1",
            "--port",
            str(DASHBOARD_PORT),
        ]
        self._spawn("dashboard", command, env)

    def stop(self) -> None:
        """The users of Redis and of the sink first (dashboard, workers: each finishes its send, QUITs and
        unregisters from Redis), then the sink, Redis last — a worker still stopping never meets a vanished
        Redis (that was a ``worker_process_crashed`` traceback in the log)."""
        users = [(name, process) for name, process in reversed(self.processes) if name != "redis"]
        self._stop_all(users)
        if self.sink is not None:
            self.sink.stop()
        self._stop_all([(name, process) for name, process in self.processes if name == "redis"])

    def _stop_all(self, processes: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
        for _, process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.say(f"{name} did not stop in 30 s; killing it")
                process.kill()
                process.wait()


def watch(store: SendStore, ids: list[str], out: TextIO, timeout: float) -> dict[str, int]:
    """Print progress until every send of the batch is delivered, failed or unknown."""
    deadline = time.monotonic() + timeout
    tty = out.isatty()
    counts: dict[str, int] = {}
    while True:
        records = store.load_many(ids)
        counts = {}
        for rec in records:
            counts[rec.state] = counts.get(rec.state, 0) + 1
        line = "  ".join(f"{state} {n}" for state, n in sorted(counts.items()))
        out.write(("\r" if tty else "") + f"progress   {line}" + ("" if tty else "\n"))
        out.flush()
        if all(rec.state in FINAL_STATES for rec in records) or time.monotonic() > deadline:
            if tty:
                out.write("\n")
            return counts
        time.sleep(0.5 if tty else 2)


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> int:
    parser = argparse.ArgumentParser(prog="python -m dispatcher.dev.demo", description=__doc__)
    parser.add_argument("--data-dir", default="demo-data", type=Path)
    parser.add_argument(
        "--exit-when-settled", action="store_true", help="stop everything once the batch settles"
    )
    parser.add_argument(
        "--timeout", type=float, default=120.0, help="give up waiting for the batch after this"
    )
    args = parser.parse_args(argv)
    (args.data_dir / "logs").mkdir(parents=True, exist_ok=True)
    configure_logging(json=True, stream=open(args.data_dir / "logs" / "devsink.log", "a"))  # noqa: SIM115
    stack = Stack(args.data_dir.resolve(), out)

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    password = secrets.token_urlsafe(12)
    try:
        stack.start_redis()
        smtp_url = stack.start_sink()
        stack.start_workers(smtp_url)
        stack.start_dashboard(password)
        connection = redis.Redis.from_url(stack.redis_url)
        results = Producer(connection).enqueue_many(demo_batch())
        ids = [r.id for r in results if not isinstance(r, Exception)]
        stack.say(f"enqueued   {len(ids)} mails (normal, a 450-once, a 550, an attachment, a UTF-8 subject)")
        counts = watch(SendStore(connection), ids, out, args.timeout)
        settled = sum(counts.get(state, 0) for state in FINAL_STATES) == len(ids)
        stack.say("settled    " + ("yes" if settled else f"no, gave up after {args.timeout:g} s"))
        stack.say(f"dashboard  http://127.0.0.1:{DASHBOARD_PORT}/  user demo  password {password}")
        stack.say(f"api        curl -H 'Authorization: Bearer {password}' "
                  f"http://127.0.0.1:{DASHBOARD_PORT}/api/v1/messages/{ids[0]}")  # fmt: skip
        stack.say(f"mail       {args.data_dir / 'mail'}   logs {args.data_dir / 'logs'}")
        python = (
            os.path.relpath(sys.executable)
            if not os.path.relpath(sys.executable).startswith("..")
            else sys.executable
        )
        stack.say(f"status     REDIS_URL={stack.redis_url} {python} enqueue.py status {ids[0]}")
        if args.exit_when_settled:
            return 0 if settled else 1
        stack.say("Ctrl-C stops everything.")
        while all(p.poll() is None for _, p in stack.processes):
            time.sleep(1)
        stack.say("a demo process exited; stopping")
        return 1
    except KeyboardInterrupt:
        stack.say("\nstopping")
        return 0
    finally:
        stack.stop()
        stack.say("stopped")


if __name__ == "__main__":
    sys.exit(main())
