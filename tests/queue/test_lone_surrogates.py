"""A lone surrogate (``"\\udce9"``, which a JSON decoder lets through) in any field is a field error through
every producer — the Python API and ``enqueue.py bulk`` here, the HTTP API in ``tests/dashboard/
test_api.py`` — never a traceback or a 500 (issue 14)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import redis

from dispatcher import cli
from dispatcher.errors import ValidationError
from dispatcher.queue.producer import Producer

BASE: dict[str, Any] = {"from": "a@example.com", "to": "b@example.org", "text": "x"}
CASES = {
    "subject": {"subject": "\udce9"},
    "text": {"text": "hi \udce9"},
    "headers.X-A": {"headers": {"X-A": "\udce9"}},
    "metadata.k": {"metadata": {"k": "\udce9"}},
    "to": {"to": "b\udce9@example.org"},
    "attachments[0].filename": {"attachments": [{"filename": "\udce9.txt", "content": "aGk="}]},
}


@pytest.mark.parametrize("path", sorted(CASES))
def test_python_api(path: str, redis_client: redis.Redis) -> None:
    with pytest.raises(ValidationError) as caught:
        Producer(redis_client).enqueue({**BASE, **CASES[path]})
    assert path in caught.value.problems and "surrogate" in caught.value.problems[path]
    assert redis_client.dbsize() == 0


def test_bulk(redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    lines = [json.dumps({**BASE, **case}) for case in CASES.values()] + [json.dumps(BASE)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--redis-url", redis_url, "bulk", "-"], out, err) == cli.EXIT_INVALID_LINES
    summary = json.loads(out.getvalue())
    assert summary["enqueued"] == 1 and summary["invalid_lines"] == list(range(1, len(CASES) + 1))
    assert err.getvalue().count("surrogate") == len(CASES), err.getvalue()
