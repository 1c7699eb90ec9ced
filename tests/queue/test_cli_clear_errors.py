"""``enqueue.py`` input that must get a clear error, not a traceback (issue 14)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import redis
from helpers import free_port

from dispatcher import cli

GOOD = {"from": "a@example.com", "to": "b@example.org", "subject": "s", "text": "x"}


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def test_bulk_reports_a_line_that_is_not_utf8_and_enqueues_the_others(
    redis_url: str, redis_client: redis.Redis, tmp_path: Path
) -> None:
    path = tmp_path / "mails.jsonl"
    good = json.dumps(GOOD).encode()
    other = json.dumps({**GOOD, "subject": "t"}).encode()
    path.write_bytes(good + b"\n" + b'{"subject": "caf\xe9"}\n' + other + b"\n")
    code, out, err = run("--redis-url", redis_url, "bulk", str(path))
    assert code == cli.EXIT_INVALID_LINES, err
    summary = json.loads(out)
    assert (summary["enqueued"], summary["invalid_lines"]) == (2, [2])
    assert "line 2: line: not UTF-8 (byte 17 is 0xe9)" in err


def test_retry_of_an_unknown_id_exits_non_zero(redis_url: str) -> None:
    code, out, err = run("--redis-url", redis_url, "retry", "mail-nope")
    assert code == cli.EXIT_USAGE
    assert json.loads(out)["results"] == {"mail-nope": "not found"}
    assert "error: no send with id 'mail-nope'" in err


def test_redis_unreachable_is_said_once() -> None:
    code, _, err = run("--redis-url", f"redis://127.0.0.1:{free_port()}/0", "send", "--from", "a@example.com",
                       "--to", "b@example.org", "--subject", "s", "--text", "t")  # fmt: skip
    assert code == cli.EXIT_UNAVAILABLE
    assert err.count("Redis is unreachable") == 1, err
