"""Fixtures of the retry tests: worker subprocesses that are always stopped at teardown."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from retrykit import StartWorker, WorkerProcess


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[StartWorker]:
    """Factory: ``start_worker(env, "--concurrency", "2") -> WorkerProcess`` (``python worker.py``).

    Every worker started is stopped at teardown (SIGTERM, deadline, SIGKILL; descendants too). When a test
    fails, the tail of each worker's log is printed to help read what happened.
    """
    started: list[WorkerProcess] = []

    def start(env: Mapping[str, str], *args: str) -> WorkerProcess:
        worker = WorkerProcess(list(args), env, tmp_path / f"worker-{len(started) + 1}.log")
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()
    for worker in started:
        tail = worker.log_path.read_text(errors="replace")[-3000:]
        print(f"--- {worker.log_path.name} (pid {worker.pid}, exit {worker.process.returncode}) ---\n{tail}")
