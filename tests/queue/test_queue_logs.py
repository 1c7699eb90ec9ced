"""The worker's JSON logs tell every transaction with its job id; no credential reaches the logs or Redis
(issue 3, "Tests": captured logs, a scan of every Redis key)."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any

import redis
from queue_support import WorkerRun, dump_redis, dump_text, smtp_url
from servers import RecordingSmtpServer, Rule

from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

USER = "mailer"
PASSWORD = "Pa55-w0rd-sekrit"


def secret_forms() -> dict[str, str]:
    """The password as it could leak: clear, and in every AUTH encoding of it."""
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    return {
        "password": PASSWORD,
        "base64(password)": base64.b64encode(PASSWORD.encode()).decode(),
        "AUTH PLAIN blob": plain,
        "AUTH PLAIN blob, unpadded": plain.rstrip("="),
        "XOAUTH2 blob": base64.b64encode(f"user={USER}\x01auth=Bearer {PASSWORD}\x01\x01".encode()).decode(),
    }


def leaks(text: str) -> list[str]:
    return [name for name, form in secret_forms().items() if form in text]


def job_events(events: list[dict[str, Any]], job_id: str) -> list[dict[str, Any]]:
    return [e for e in events if e.get("job_id") == job_id]


def test_logs_tell_each_transaction_and_no_credential_is_logged_or_stored(
    redis_client: redis.Redis,
    smtp_server: Callable[..., RecordingSmtpServer],
    start_workers: Callable[..., WorkerRun],
) -> None:
    sink = smtp_server(
        auth_users={USER: PASSWORD}, rules={"nobody@example.org": Rule(550, "5.1.1 No such user")}
    )
    producer = Producer(redis_client)
    mails = [
        # First: AUTH happens in its attempt, and its refused recipient makes the transcript stored in Redis.
        {"from": "app@example.com", "to": ["ann@example.org", "nobody@example.org"], "subject": "one",
         "text": "1", "metadata": {"campaign": "c1"}},
        {"from": "app@example.com", "to": "bob@example.org", "cc": "cid@example.org", "subject": "two",
         "text": "2"},
        {"from": "app@example.com", "to": "dee@example.org", "bcc": "eve@example.org", "subject": "three",
         "html": "<p>3</p>"},
    ]  # fmt: skip
    sent = [producer.enqueue(m) for m in mails]

    worker = start_workers(
        smtp_url(sink.port, user=USER, password=PASSWORD, query="allow_plaintext_auth=true"), "--burst"
    )
    assert worker.wait(timeout=30) == 0, worker.text()

    # The sink really authenticated us (so the password was really used) and got all three messages.
    auth_lines = [line for line in sink.command_lines() if line.upper().startswith("AUTH ")]
    assert auth_lines
    # The detector works: what crossed the wire holds the credential in a form we search for.
    assert leaks("\n".join(auth_lines)), auth_lines
    assert len(sink.messages) == 3
    events = worker.events()
    assert worker.raw_lines() == [], "every log line is a JSON object"

    for result, mail in zip(sent, mails, strict=True):
        # The first attempt's rq job id is the send id.
        mine = job_events(events, result.id)
        assert mine, f"no event carries job_id {result.id}"
        recipients = [r for field in ("to", "cc", "bcc") for r in _as_list(mail.get(field))]
        # At INFO the message's transaction is one smtp_transaction event carrying its lines, in order.
        (tx,) = [e for e in mine if e.get("event") == "smtp_transaction"]
        commands = [line.split(" > ", 1)[1] for line in tx["lines"] if " > " in line]
        assert any(c.startswith("MAIL FROM:<app@example.com>") for c in commands), commands
        for recipient in recipients:
            assert f"RCPT TO:<{recipient}>" in commands, (recipient, commands)
        assert any(c == "DATA" or c.startswith("BDAT ") for c in commands), commands
        stages = [line.split(" < ", 1)[0] for line in tx["lines"] if " < " in line]
        assert "mail" in stages and stages.count("rcpt") == len(recipients), stages
        if "DATA" in commands:
            assert "data" in stages
        if any(c == "DATA" or c.endswith(" LAST") for c in commands):  # the final reply was expected
            assert "data_end" in stages or "bdat" in stages, stages
        assert any(c.endswith(" bytes of message data>") for c in commands), commands
        assert not [e for e in mine if e.get("level") == "debug"], "DEBUG events are not written at INFO"
        summary = [e for e in mine if e.get("event") in ("mail_delivered", "mail_deferred", "mail_failed")]
        assert len(summary) == 1, summary
        for field in ("message_id", "attempt", "route", "worker"):
            assert field in summary[0], (field, summary[0])
        assert summary[0]["message_id"] == result.message_id and summary[0]["attempt"] == 1
        assert "total_ms" in summary[0] and summary[0]["recipients"]
        # Every transcript event of the job carries the job's context.
        for event in mine:
            if event.get("event", "").startswith("smtp_"):
                assert event["message_id"] == result.message_id and event["route"] == "default"

    # AUTH is logged, redacted, inside the first job's context.
    auth = [e for e in events if e.get("event") == "smtp_command" and e.get("stage") == "auth"]
    assert auth and all(e.get("job_id") == sent[0].id for e in auth)
    first = SendStore(redis_client).load(sent[0].id)
    assert first is not None and first.status().get("transcript"), "a refused recipient keeps the transcript"
    assert any(entry.get("stage") == "auth" for entry in first.status()["transcript"])

    # No credential anywhere: not in the logs, not in any Redis key of any type (rq's zlib'd job data too).
    assert leaks(worker.text()) == []
    dump = dump_redis(redis_client)
    text = dump_text(dump)
    # The scan sees inside rq's zlib-compressed job data (the function name lives only there).
    assert "dispatcher.delivery.jobs.deliver" in text, sorted(dump)
    for result in sent:
        assert result.message_id in text
    assert leaks(text) == [], [k for k, v in dump.items() if leaks(dump_text({k: v}))]


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)
