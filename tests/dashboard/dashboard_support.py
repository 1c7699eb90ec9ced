"""Helpers for the dashboard tests: app configs, logging in, real workers (in-process burst or subprocess).

Failures are made the real way: a mail is enqueued, a real ``MailWorker`` sends it to a real DevSink whose
rules refuse the recipient, and the send record says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from flask import Flask
from flask.testing import FlaskClient
from helpers import wait_until
from rq import Queue
from rq.serializers import JSONSerializer
from werkzeug.serving import BaseWSGIServer, make_server

from dispatcher.dashboard import DashboardConfig
from dispatcher.queue.producer import QUEUE_NAMES, connect
from dispatcher.settings import load_settings
from dispatcher.worker.process import MailWorker
from dispatcher.worker.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
API_TOKEN = "test-api-token-0123456789"
USER = "ops"
PASSWORD = "correct horse battery staple"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
STOP_DEADLINE = 10.0


def make_config(redis_url: str, **overrides: Any) -> DashboardConfig:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "user": USER,
        "password": PASSWORD,
        "api_token": API_TOKEN,
        "secret_key": b"dashboard-tests-secret-key-32byt",
    }
    values.update(overrides)
    return DashboardConfig(**values)


def mail(**fields: Any) -> dict[str, Any]:
    """A valid mail object; ``fields`` override or add (a value of None removes the field)."""
    data: dict[str, Any] = {
        "from": "App <app@example.com>",
        "to": ["ann@example.org"],
        "subject": "Your receipt",
        "text": "Thanks!",
    }
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def csrf_of(client: FlaskClient) -> str:
    with client.session_transaction() as session:
        token = session.get("csrf_token")
    assert isinstance(token, str), "no CSRF token in the session: GET a page first"
    return token


def log_in(client: FlaskClient) -> None:
    assert client.get("/login").status_code == 200
    response = client.post(
        "/login", data={"username": USER, "password": PASSWORD, "csrf_token": csrf_of(client), "next": "/"}
    )
    assert response.status_code == 302, response.get_data(as_text=True)


def smtp_url(port: int) -> str:
    return f"smtp://127.0.0.1:{port}?tls=off"


def deliver_queued(redis_url: str, smtp_port: int) -> None:
    """Run a real ``MailWorker`` in this process until the queues are empty (one attempt per send)."""
    settings = load_settings({"REDIS_URL": redis_url, "SMTP_URL": smtp_url(smtp_port)}, need_routes=True)
    connection = connect(redis_url)
    try:
        queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in QUEUE_NAMES]
        worker = MailWorker(queues, connection=connection, runtime=Runtime(settings))
        worker.work(burst=True, with_scheduler=False, logging_level="WARNING")
    finally:
        connection.close()


def worker_env(redis_url: str, smtp_port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("SMTP_URL", "DISPATCH_")) or k == "REDIS_URL")
    }
    env.update(
        REDIS_URL=redis_url,
        SMTP_URL=smtp_url(smtp_port),
        DISPATCH_RETRY_BASE="3600",  # the automatic retry is an hour away: only the dashboard retries
        DISPATCH_LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    return env


class LoggedProcess:
    """A subprocess of ours in its own process group, its output in ``log_path``; ``stop()`` sends SIGTERM
    and waits with a deadline, then kills the group (rq's scheduler child, if one is left)."""

    def __init__(self, command: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            start_new_session=True,
        )

    def text(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")

    def stop(self) -> int:
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                return self.proc.wait(timeout=STOP_DEADLINE)
        finally:
            self._log.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # only our own group


class WorkerProcess(LoggedProcess):
    """``python worker.py``."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        super().__init__([sys.executable, "worker.py"], env, log_path)

    def log(self) -> str:
        return self.log_path.read_bytes().decode("utf-8", "replace")[-6000:]


@contextlib.contextmanager
def serve(app: Flask) -> Iterator[str]:
    """Serve ``app`` on a free loopback port in a thread; yields its base URL."""
    server: BaseWSGIServer = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join(timeout=STOP_DEADLINE)
        server.server_close()


def state_of(redis_url: str, send_id: str) -> str | None:
    client = redis.Redis.from_url(redis_url)
    try:
        value = client.hget(f"dispatch:send:{send_id}", "state")
    finally:
        client.close()
    return value.decode() if isinstance(value, bytes) else None


class DashboardProcess(LoggedProcess):
    """``python -m dispatcher.dashboard --port 0`` as a subprocess; its log (stderr) goes to ``log_path``,
    ``url`` is read from its ``dashboard_started`` line; ``stop()`` sends SIGTERM and waits."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        super().__init__([sys.executable, "-m", "dispatcher.dashboard", "--port", "0", *args], env, log_path)
        self.url = ""

        def started() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"dashboard exited {self.proc.returncode}:\n{self.text()}")
            for line in self.text().splitlines():
                if '"dashboard_started"' in line:
                    self.url = json.loads(line)["url"].rstrip("/")
                    return True
            return False

        wait_until(started, timeout=30, message=f"dashboard did not start:\n{self.text()}")
