"""Start-up without Redis and with a wrong Redis URL (issue 14): the real ``worker.py``, ``enqueue.py`` and
dashboard as subprocesses. A worker waits for Redis with one log line per attempt and delivers once it is
up; a URL that is not a Redis URL is exit 2 with one line naming the option, never a traceback."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import free_port
from queue_support import PYTHON, ROOT, WorkerRun, base_env, smtp_url
from servers import RecordingSmtpServer
from servers.redis_server import RedisServer

from dispatcher.queue.producer import Producer

StartWorkers = Callable[..., WorkerRun]
BAD_URLS = ["http://127.0.0.1:1/0", "redis://[broken/0", "redis://user:pa/ss@127.0.0.1:1/0"]


def waits(event: dict[str, object]) -> bool:
    return event.get("event") == "worker_waiting_for_redis"


def test_a_worker_started_while_redis_is_down_waits_then_delivers(
    tmp_path: Path,
    smtp_server: Callable[..., RecordingSmtpServer],
    start_workers: StartWorkers,
) -> None:
    sink = smtp_server()
    port = free_port()
    worker = start_workers(smtp_url(sink.port), env={"REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    worker.wait_for_event(lambda e: waits(e) and e.get("attempt") == 2, 20, "a second waiting line")
    line = next(e for e in worker.events() if waits(e))
    assert line["redis"] == f"127.0.0.1:{port}/0" and line["retry_in"] == 0.5 and "refused" in line["error"]
    assert worker.proc.poll() is None
    redis_up = RedisServer(port=port, data_dir=tmp_path / "late-redis")
    redis_up.start()
    try:
        mail = {"from": "app@example.com", "to": "ann@example.org", "text": "late"}
        Producer(redis_up.client()).enqueue(mail)
        sink.wait_for_messages(1, timeout=30)
        worker.stop()
        assert worker.raw_lines() == [], worker.text()  # no traceback: one JSON line per attempt
        delays = [e["retry_in"] for e in worker.events() if waits(e)]
        assert delays == sorted(delays) and max(delays) <= 10.0
    finally:
        redis_up.close()


def test_a_stop_while_waiting_for_redis_exits_0(start_workers: StartWorkers) -> None:
    worker = start_workers(smtp_url(free_port()), env={"REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"})
    worker.wait_for_event(waits, 20, "the waiting line")
    worker.terminate()
    assert worker.wait(20) == 0
    assert worker.raw_lines() == [], worker.text()


@pytest.mark.parametrize("url", BAD_URLS)
def test_worker_refuses_a_redis_url_that_is_not_one(url: str, start_workers: StartWorkers) -> None:
    by_option = start_workers(smtp_url(free_port()), "--redis-url", url)
    by_env = start_workers(smtp_url(free_port()), env={"REDIS_URL": url})
    for run, label in ((by_option, "--redis-url"), (by_env, "REDIS_URL")):
        assert run.wait(30) == 2
        lines = run.text().splitlines()
        assert len(lines) == 1 and run.raw_lines() == [], run.text()
        assert f'"error": "{label}: ' in lines[0] and "worker_config_invalid" in lines[0]
        assert "pa/ss" not in lines[0] and "ss@" not in lines[0]


@pytest.mark.parametrize("url", BAD_URLS)
def test_enqueue_refuses_a_redis_url_that_is_not_one(url: str, redis_url: str) -> None:
    for args, env, label in (
        (["--redis-url", url], {}, "--redis-url"),
        ([], {"REDIS_URL": url}, "REDIS_URL"),
    ):
        done = subprocess.run(
            [PYTHON, "enqueue.py", *args, "status", "mail-x"],
            cwd=ROOT, env=base_env(redis_url, **env), capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {label}: ") and done.stderr.count("\n") == 1, done.stderr
        assert "pa/ss" not in done.stderr and "Traceback" not in done.stderr


def test_dashboard_refuses_a_redis_url_that_is_not_one(redis_url: str) -> None:
    env = base_env(
        "http://127.0.0.1:1/0", DISPATCH_DASHBOARD_USER="u", DISPATCH_DASHBOARD_PASSWORD="p" * 12
    )
    done = subprocess.run(
        [PYTHON, "-m", "dispatcher.dashboard", "--port", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "dashboard_config_invalid" in lines[0] and '"error": "REDIS_URL: ' in lines[0]
