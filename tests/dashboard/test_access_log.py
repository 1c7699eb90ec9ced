"""werkzeug's access log inside the real dashboard process's JSON log (issue 14): every request is one
plain JSON ``dashboard_request`` event with fields — no ANSI colour codes (werkzeug colours 3xx/4xx/5xx
lines), nothing that is not a JSON object."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from dashboard_support import PASSWORD, USER, DashboardProcess, worker_env
from helpers import free_port, wait_until


@pytest.fixture
def dashboard(redis_url: str, tmp_path: Path) -> Iterator[DashboardProcess]:
    env = worker_env(redis_url, free_port())
    env.update(DISPATCH_DASHBOARD_USER=USER, DISPATCH_DASHBOARD_PASSWORD=PASSWORD, DISPATCH_LOG_LEVEL="INFO")
    process = DashboardProcess(env, tmp_path / "dashboard.log")
    yield process
    process.stop()


def request(base: str, method: str, path: str) -> int:
    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request(method, path, headers={"Host": "127.0.0.1"})
        return connection.getresponse().status
    finally:
        connection.close()


def test_access_log_lines_are_plain_json_events(dashboard: DashboardProcess) -> None:
    asked = [
        ("GET", "/login", 200),
        ("GET", "/", 302),
        ("GET", "/static/nope.css", 404),
        ("POST", "/logout", 400),
        ("GET", "/api/v1/messages/mail-x", 503),
        ("GET", "/static/dashboard.css", 200),
    ]
    for method, path, status in asked:
        assert request(dashboard.url, method, path) == status, path

    def logged() -> list[dict[str, object]]:
        lines = [json.loads(line) for line in dashboard.text().splitlines()]
        return [e for e in lines if e.get("event") == "dashboard_request"]

    wait_until(lambda: len(logged()) == len(asked), timeout=10, message=dashboard.text())
    text = dashboard.text()
    decoded = [json.loads(line) for line in text.splitlines()]  # every line a JSON object
    assert not [e for e in decoded if "\x1b" in json.dumps(e, ensure_ascii=False)], text  # no colour codes
    seen = [(e["method"], e["path"], e["status"]) for e in logged()]
    assert seen == [(m, p, s) for m, p, s in asked], seen
    assert all(e["remote"] == "127.0.0.1" and e["level"] == "info" for e in logged())
