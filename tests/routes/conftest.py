"""Fixtures of the route tests: worker pools that are always stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
from route_support import Workers


@pytest.fixture
def start_workers(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., Workers]]:
    """Factory: ``start_workers({"SMTP_URL": ...}, concurrency=4) -> Workers`` against the private Redis."""
    started: list[Workers] = []

    def start(env: Mapping[str, str], concurrency: int = 4) -> Workers:
        workers = Workers(
            {"REDIS_URL": redis_url, **env}, concurrency, tmp_path / f"workers-{len(started)}.log"
        )
        started.append(workers)
        return workers

    yield start
    for workers in started:
        workers.stop()
