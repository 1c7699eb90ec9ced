"""Bad input through the Python API and ``enqueue.py`` stores nothing and names the field; ``status`` after a
delivery; a worker without SMTP_URL refuses to start (issue 3, "Tests")."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
import redis
from queue_support import WorkerRun, queued_send_ids, smtp_url
from servers import RecordingSmtpServer

from dispatcher.cli import EXIT_INVALID_LINES, EXIT_USAGE
from dispatcher.errors import ValidationError
from dispatcher.queue.producer import Enqueued, Producer, enqueue, enqueue_many
from dispatcher.queue.store import STATES, SendStore

RunCli = Callable[..., subprocess.CompletedProcess[str]]
INJECTED = "Hi\r\nBcc: victim@evil.test"


def good(n: int = 0, **extra: Any) -> dict[str, Any]:
    return {
        "from": "app@example.com",
        "to": f"rcpt{n}@example.org",
        "subject": f"ok {n}",
        "text": "hi",
        **extra,
    }


def without(mail: dict[str, Any], *names: str) -> dict[str, Any]:
    return {k: v for k, v in mail.items() if k not in names}


# (name, mail, field the error names, words of the problem); all invalid, none may be stored.
BAD_MAILS: list[tuple[str, dict[str, Any], str, str]] = [
    ("crlf-subject", good(subject=INJECTED), "subject", "line break"),
    ("address-without-at", good(to="rcpt.example.org"), "to", "'@'"),
    ("address-without-at-in-list", good(to=["ok@example.org", "nobody"]), "to[1]", "'@'"),
    ("no-recipients", without(good(), "to"), "to", "at least one recipient"),
    ("unknown-field", good(colour="blue"), "colour", "unknown field"),
    ("header-injection", good(headers={"X-Campaign": "a\r\nBcc: victim@evil.test"}), "headers.X-Campaign",
     "line break"),
    ("header-injection-lf", good(headers={"X-Campaign": "a\nBcc: victim@evil.test"}), "headers.X-Campaign",
     "line break"),
    ("reserved-header", good(headers={"Bcc": "victim@evil.test"}), "headers.Bcc", "reserved"),
    ("crlf-in-from", good(**{"from": "app@example.com\r\nBcc: victim@evil.test"}), "from", ""),
    ("oversize", good(text="x" * 4000), "size", "too large"),
]  # fmt: skip
SMALL_LIMIT = 2048


def stored_keys(client: redis.Redis) -> list[bytes]:
    return sorted(client.scan_iter())


def state_counts(client: redis.Redis) -> dict[str, int]:
    return SendStore(client).count_states()


@pytest.mark.parametrize(("name", "mail", "field", "words"), BAD_MAILS, ids=[b[0] for b in BAD_MAILS])
def test_python_api_rejects_bad_mail_naming_the_field_and_stores_nothing(
    redis_client: redis.Redis, name: str, mail: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ValidationError) as caught:
        Producer(redis_client, max_bytes=SMALL_LIMIT).enqueue(mail)
    assert field in caught.value.problems, caught.value.problems
    assert words in caught.value.problems[field]
    assert str(caught.value).startswith(f"{field}: ") or f"{field}: " in str(caught.value)
    if name != "oversize":  # the module-level API (default size limit) refuses the same mail the same way
        with pytest.raises(ValidationError) as again:
            enqueue(mail, connection=redis_client)
        assert field in again.value.problems
    assert stored_keys(redis_client) == []


def test_enqueue_many_keeps_the_valid_mails_of_a_mixed_batch(redis_client: redis.Redis) -> None:
    batch = [good(0), BAD_MAILS[0][1], good(1), BAD_MAILS[4][1], good(2)]
    results = Producer(redis_client).enqueue_many(batch)
    assert [type(r) for r in results] == [Enqueued, ValidationError, Enqueued, ValidationError, Enqueued]
    assert len(list(redis_client.scan_iter("dispatch:send:*"))) == 3
    assert state_counts(redis_client)["queued"] == 3
    valid_ids = sorted(r.id for r in results if isinstance(r, Enqueued))
    assert queued_send_ids(redis_client) == valid_ids

    # The all-or-nothing module API refuses the whole batch for one bad mail.
    redis_client.flushall()
    with pytest.raises(ValidationError) as caught:
        enqueue_many(batch, connection=redis_client)
    # Every bad item, named by its index (issue 14: the problems did not say which item).
    assert set(caught.value.problems) == {"[1].subject", "[3].colour"}
    assert stored_keys(redis_client) == []


def test_cli_send_rejects_bad_mail_naming_the_field_and_stores_nothing(
    redis_client: redis.Redis, run_cli: RunCli
) -> None:
    base = ["send", "--from", "app@example.com", "--text", "hi"]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        ([*base, "--to", "ann@example.org", "--subject", INJECTED], {}, "subject: contains a line break"),
        ([*base, "--to", "ann.example.org"], {}, "to[0]: not an email address"),
        (base, {}, "to: missing"),
        ([*base, "--to", "ann@example.org", "--header", "X-Campaign: a\r\nBcc: victim@evil.test"], {},
         "headers.X-Campaign: contains a line break"),
        ([*base, "--to", "ann@example.org", "--header", "Bcc: victim@evil.test"], {},
         "headers.Bcc: reserved"),
        ([*base, "--to", "ann@example.org", "--text", "x" * 3000], {"DISPATCH_MAX_MESSAGE_BYTES": "1024"},
         "size: too large"),
    ]  # fmt: skip
    for argv, env, expected in cases:
        done = run_cli(*argv, env=env)
        assert done.returncode == EXIT_USAGE, (argv, done.stdout, done.stderr)
        assert expected in done.stderr, (argv, done.stderr)
        assert "nothing was enqueued" in done.stderr
        assert done.stdout == ""
    assert stored_keys(redis_client) == []


def test_cli_bulk_enqueues_the_valid_lines_and_reports_the_invalid_ones(
    redis_client: redis.Redis, run_cli: RunCli, tmp_path: Path
) -> None:
    lines = [
        json.dumps(good(1)),  # 1 valid
        '{"from": "app@example.com", "to": ',  # 2 malformed JSON
        json.dumps(good(subject=INJECTED)),  # 3 CRLF in a subject
        json.dumps(good(2)),  # 4 valid
        json.dumps(good(colour="blue")),  # 5 unknown field
        json.dumps(without(good(), "to")),  # 6 no recipients
        json.dumps(good(to="rcpt.example.org")),  # 7 address without @
        json.dumps(good(headers={"X-Campaign": "a\r\nBcc: victim@evil.test"})),  # 8 header injection
        json.dumps(good(text="x" * 3000)),  # 9 oversize (DISPATCH_MAX_MESSAGE_BYTES=1024)
        "",  # 10 blank: skipped, not an error
        json.dumps([good(4)]),  # 11 not an object
        json.dumps(good(3, key="k-3")),  # 12 valid
        json.dumps(good(3, key="k-3")),  # 13 duplicate key: not invalid, not enqueued twice
    ]
    path = tmp_path / "mails.jsonl"
    path.write_text("\n".join(lines) + "\n")

    done = run_cli("bulk", str(path), env={"DISPATCH_MAX_MESSAGE_BYTES": "1024"})

    assert done.returncode == EXIT_INVALID_LINES, done.stderr
    summary = json.loads(done.stdout)
    assert summary == {
        "enqueued": 3,
        "duplicate": 1,
        "invalid": 8,
        "invalid_lines": [2, 3, 5, 6, 7, 8, 9, 11],
    }
    expected = [
        "line 2: line: not valid JSON",
        "line 3: subject: contains a line break",
        "line 5: colour: unknown field",
        "line 6: to: missing",
        "line 7: to: not an email address",
        "line 8: headers.X-Campaign: contains a line break",
        "line 9: size: too large",
        "line 11: line: must be a JSON object",
    ]
    for problem in expected:
        assert problem in done.stderr, (problem, done.stderr)
    # Exactly the three valid lines are stored and queued; nothing of the invalid ones.
    sends = list(redis_client.scan_iter("dispatch:send:*"))
    assert len(sends) == 3
    subjects = sorted(json.loads(redis_client.hget(k, "mail") or b"{}")["subject"] for k in sends)
    assert subjects == ["ok 1", "ok 2", "ok 3"]
    assert state_counts(redis_client) == {**dict.fromkeys(STATES, 0), "queued": 3}
    assert queued_send_ids(redis_client) == sorted(k.decode().removeprefix("dispatch:send:") for k in sends)
    assert b"victim@evil.test" not in b"".join(redis_client.hget(k, "mail") or b"" for k in sends)


def test_cli_bulk_reads_stdin(redis_client: redis.Redis, run_cli: RunCli) -> None:
    done = run_cli("bulk", "-", stdin=json.dumps(good(1)) + "\nnot json\n")
    assert done.returncode == EXIT_INVALID_LINES
    assert json.loads(done.stdout)["invalid_lines"] == [2]
    assert len(list(redis_client.scan_iter("dispatch:send:*"))) == 1


def test_status_after_delivery(
    redis_client: redis.Redis,
    run_cli: RunCli,
    smtp_server: Callable[..., RecordingSmtpServer],
    start_workers: Callable[..., WorkerRun],
) -> None:
    sink = smtp_server()
    argv = ["send", "--from", "app@example.com", "--to", "ann@example.org", "--cc", "bob@example.org",
            "--bcc", "cid@example.org", "--subject", "status", "--text", "hi",
            "--key", "status-1"]  # fmt: skip
    first = run_cli(*argv)
    assert first.returncode == 0, first.stderr
    send_id = first.stdout.strip()
    again = run_cli(*argv)
    assert again.returncode == 0 and again.stdout.strip() == send_id
    assert "duplicate key" in again.stderr

    queued = run_cli("status", send_id)
    assert queued.returncode == 0 and json.loads(queued.stdout)["state"] == "queued"

    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=30) == 0, worker.text()
    assert len(sink.messages) == 1
    assert sorted(sink.messages[0].rcpt_tos) == ["ann@example.org", "bob@example.org", "cid@example.org"]
    assert message_from_bytes(sink.messages[0].data)["Bcc"] is None

    done = run_cli("status", send_id)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["id"] == send_id and status["state"] == "delivered" and status["attempts"] == 1
    assert set(status["recipients"]) == {"ann@example.org", "bob@example.org", "cid@example.org"}
    assert {r["status"] for r in status["recipients"].values()} == {"accepted"}
    assert status["last_reply"]["code"] == 250
    assert status["reason"] is None
    connected = [e["conn_id"] for e in worker.events() if e.get("event") == "smtp_connected"]
    assert len(connected) == 1
    assert [h["conn_id"] for h in status["history"]] == connected
    assert status["history"][0]["attempt"] == 1 and status["history"][0]["job_id"] == send_id

    missing = run_cli("status", "mail-doesnotexist")
    assert missing.returncode == EXIT_USAGE and "mail-doesnotexist" in missing.stderr


@pytest.mark.parametrize(
    ("smtp_env", "args"),
    [(None, ["--burst"]), (None, ["--concurrency", "3", "--burst"]), ("smtp://127.0.0.1:25?tls=bogus", [])],
    ids=["unset", "unset-pool", "invalid"],
)
def test_worker_without_a_usable_smtp_url_refuses_to_start(
    redis_client: redis.Redis,
    start_workers: Callable[..., WorkerRun],
    smtp_env: str | None,
    args: list[str],
) -> None:
    redis_client.rpush("sentinel", "x")
    worker = start_workers(smtp_env, *args)
    assert worker.wait(timeout=20) == 2, worker.text()
    assert "SMTP_URL" in worker.text()
    errors = [e for e in worker.events() if e.get("level") == "error"]
    assert errors and "SMTP_URL" in json.dumps(errors)
    assert not worker.has_event("pool_started") and not worker.has_event("worker_started")
    assert redis_client.smembers("rq:workers") == set()
