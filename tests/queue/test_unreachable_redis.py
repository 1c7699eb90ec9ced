"""A mail without an idempotency key, Redis unreachable: ``QueueUnavailable`` (and exit 3 from
``enqueue.py``), as the README promises — not redis-py's ``ConnectionError``. Without a key nothing is
WATCHed, so the first command to reach Redis is rq's own ``enqueue_job`` on the pipeline, past the store's
boundary (found by issue 16's outbox test after the store became the one owner of the keys)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable

import pytest
import redis
from helpers import free_port
from redis.backoff import NoBackoff
from redis.retry import Retry

import dispatcher
from dispatcher.errors import QueueUnavailable

RunCli = Callable[..., subprocess.CompletedProcess[str]]
MAIL = {"from": "app@example.com", "to": "ann@example.org", "subject": "s", "text": "x"}


@pytest.fixture
def nowhere() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def test_the_python_api_says_queue_unavailable(nowhere: str) -> None:
    client = redis.Redis.from_url(nowhere, retry=Retry(NoBackoff(), 0))
    with pytest.raises(QueueUnavailable, match="nothing was enqueued"):
        dispatcher.enqueue(MAIL, connection=client)
    with pytest.raises(QueueUnavailable, match="nothing was enqueued"):
        dispatcher.enqueue_many([MAIL, MAIL], connection=client)


def test_enqueue_py_send_exits_3_with_one_clear_line(nowhere: str, run_cli: RunCli) -> None:
    done = run_cli("--redis-url", nowhere, "send", "--from", "app@example.com", "--to", "ann@example.org",
                   "--subject", "s", "--text", "x")  # fmt: skip
    assert done.returncode == 3, done.stderr
    assert "Redis is unreachable" in done.stderr and "Traceback" not in done.stderr
