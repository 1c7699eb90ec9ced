"""Fixtures for the queue tests; the classes and helpers behind them are in ``queue_support``."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import redis
from queue_support import PYTHON, ROOT, GatedSink, WorkerRun, base_env
from servers.redis_server import RedisServer


@pytest.fixture
def start_workers(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerRun]]:
    """Factory: ``start_workers(smtp_url, "--burst", env={...}) -> WorkerRun`` (started; ``smtp_url=None``
    leaves SMTP_URL unset). Every worker started is stopped at teardown (SIGTERM, deadline, SIGKILL)."""
    started: list[WorkerRun] = []

    def start(url: str | None, *args: str, env: Mapping[str, str] | None = None) -> WorkerRun:
        extra = dict(env or {})
        if url is not None:
            extra["SMTP_URL"] = url
        run = WorkerRun(args, base_env(redis_url, **extra), tmp_path / f"worker-{len(started)}.log")
        started.append(run)
        return run

    yield start
    for run in started:
        run.stop()


@pytest.fixture
def run_cli(redis_url: str) -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_cli("send", "--from", ..., stdin=None, env={...})``: ``python enqueue.py ...`` to the end."""

    def run(
        *args: str, stdin: str | None = None, env: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "enqueue.py", *args],
            cwd=ROOT,
            env=base_env(redis_url, **dict(env or {})),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    return run


@pytest.fixture
def gated_sink() -> Iterator[GatedSink]:
    sink = GatedSink(port=0)
    sink.start()
    yield sink
    sink.release.set()
    sink.stop()


@pytest.fixture(autouse=True)
def _redis_is_ours(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    """Fail loudly if the Redis at ``redis_url`` is not the redis-server this session started (a port
    taken over by another run's server): cross-talk would otherwise look like lost or stolen jobs."""
    assert redis_server.process is not None
    pid = redis_client.info("server")["process_id"]
    assert pid == redis_server.process.pid, f"port {redis_server.port} answers from pid {pid}, not ours"
