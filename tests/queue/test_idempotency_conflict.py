"""An idempotency key names one mail (issue 14): the same key again with the same mail is a duplicate
(the first id, nothing stored twice); with a *different* mail it is refused — a clear error from the
Python API and ``enqueue.py``, 409 from the HTTP API (``tests/dashboard/test_api.py``) — never silently
answered with the first mail's id, as it was."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import redis

from dispatcher import cli
from dispatcher.errors import IdempotencyConflict
from dispatcher.queue.producer import Enqueued, Producer

MAIL: dict[str, Any] = {"from": "a@example.com", "to": "b@example.org", "subject": "Hi", "text": "x",
                        "key": "order-42"}  # fmt: skip


def sends(client: redis.Redis) -> int:
    return len(list(client.scan_iter("dispatch:send:*")))


def test_same_key_same_mail_is_a_duplicate_and_a_different_mail_a_conflict(redis_client: redis.Redis) -> None:
    producer = Producer(redis_client)
    first = producer.enqueue(MAIL)
    again = producer.enqueue(dict(MAIL))
    assert again.duplicate and again.id == first.id
    with pytest.raises(IdempotencyConflict) as caught:
        producer.enqueue({**MAIL, "subject": "Hi again"})
    assert caught.value.send_id == first.id and "key" in caught.value.problems
    assert sends(redis_client) == 1


def test_within_one_batch_too(redis_client: redis.Redis) -> None:
    results = Producer(redis_client).enqueue_many([MAIL, dict(MAIL), {**MAIL, "text": "other"}])
    assert isinstance(results[0], Enqueued) and isinstance(results[1], Enqueued) and results[1].duplicate
    assert isinstance(results[2], IdempotencyConflict)
    assert sends(redis_client) == 1


def test_cli_send_names_the_key(redis_url: str, redis_client: redis.Redis) -> None:
    Producer(redis_client).enqueue(MAIL)
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--redis-url", redis_url, "send", "--from", "a@example.com", "--to", "b@example.org",
                     "--subject", "Other", "--text", "x", "--key", "order-42"], out, err)  # fmt: skip
    assert code == cli.EXIT_USAGE, err.getvalue()
    assert "key: already used for a different mail" in err.getvalue()
    assert sends(redis_client) == 1


def test_bulk_reports_the_conflicting_line(
    redis_url: str, redis_client: redis.Redis, monkeypatch: Any
) -> None:
    lines = [json.dumps(MAIL), json.dumps({**MAIL, "subject": "changed"}), json.dumps(MAIL)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--redis-url", redis_url, "bulk", "-"], out, err) == cli.EXIT_INVALID_LINES
    summary = json.loads(out.getvalue())
    assert (summary["enqueued"], summary["duplicate"], summary["invalid_lines"]) == (1, 1, [2])
    assert "line 2: key: already used for a different mail" in err.getvalue()
