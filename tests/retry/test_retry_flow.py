"""Retries end to end: real worker processes, a real SMTP sink, tiny backoff delays.

Covers: three recipients answered 250 / 450 / 550; the whole retry schedule ending in a failure record;
a server's "try again in N seconds" hint.
"""

from __future__ import annotations

from collections.abc import Callable

import redis
from helpers import wait_until
from retrykit import (
    InProcess,
    StartWorker,
    attempts_made,
    deliveries,
    env_for,
    load,
    mail,
    smtp_url,
    state_of,
    status,
)
from servers import RecordingSmtpServer, Rule

from dispatcher.queue.producer import Producer

Sink = Callable[..., RecordingSmtpServer]


def test_250_450_550_delivers_once_retries_once_and_fails_with_reason(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    ok, soft, hard = "ok@example.test", "soft@example.test", "hard@example.test"
    sink = smtp_server(
        rules={soft: Rule(450, "4.2.0 mailbox busy", times=1), hard: Rule(550, "5.1.1 no such user")}
    )
    done = Producer(redis_client).enqueue(mail([ok, soft, hard]))
    start_worker(env_for(redis_url, smtp_url(sink.port)))
    wait_until(
        lambda: state_of(redis_client, done.id) in ("delivered", "failed", "unknown"),
        30,
        message="the send never reached a final state",
    )
    shown = status(redis_url, done.id)
    assert shown["state"] == "failed"
    assert shown["attempts"] == 2
    recipients = shown["recipients"]
    assert recipients[ok]["status"] == "accepted"
    assert recipients[soft]["status"] == "accepted"
    assert (
        recipients[hard]["status"],
        recipients[hard]["stage"],
        recipients[hard]["code"],
        recipients[hard]["enhanced"],
    ) == ("permanent", "rcpt", 550, "5.1.1")
    assert "no such user" in recipients[hard]["text"]
    reason = shown["reason"]
    assert (reason["kind"], reason["stage"], reason["code"], reason["enhanced"]) == (
        "recipient",
        "rcpt",
        550,
        "5.1.1",
    )
    history = [h for h in shown["history"] if "event" not in h]
    assert [h["outcomes"] for h in history] == [
        {ok: "accepted", soft: "transient", hard: "permanent"},
        {soft: "accepted"},
    ]
    counts = deliveries(sink.messages)
    assert counts[(done.message_id, ok)] == 1
    assert counts[(done.message_id, soft)] == 1
    assert counts[(done.message_id, hard)] == 0
    rcpt_lines = [line for _, line in sink.commands if line.upper().startswith("RCPT")]
    assert sum(hard in line for line in rcpt_lines) == 1, "a permanently refused recipient was retried"
    assert sum(ok in line for line in rcpt_lines) == 1, "an accepted recipient was sent to again"


def test_failure_reason_names_the_permanent_refusal_whatever_the_recipient_order(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    # Same as above with the 550 recipient before the 450 one: once the 450 one is delivered, the send
    # failed because of the 550 alone; ``--code 5xx`` must find it and the reason must say 550.
    hard, soft = "hard@example.test", "soft@example.test"
    sink = smtp_server(
        rules={soft: Rule(450, "4.2.0 mailbox busy", times=1), hard: Rule(550, "5.1.1 no such user")}
    )
    done = Producer(redis_client).enqueue(mail([hard, soft]))
    start_worker(env_for(redis_url, smtp_url(sink.port)))
    wait_until(
        lambda: state_of(redis_client, done.id) in ("delivered", "failed", "unknown"),
        30,
        message="the send never reached a final state",
    )
    shown = status(redis_url, done.id)
    assert shown["state"] == "failed"
    assert shown["recipients"][soft]["status"] == "accepted"
    assert (shown["reason"]["code"], shown["reason"]["enhanced"]) == (550, "5.1.1"), shown["reason"]


def test_whole_schedule_ends_in_an_exhausted_failure_record(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    always = "always-busy@example.test"
    sink = smtp_server(rules={always: Rule(451, "4.3.0 try later")})
    done = Producer(redis_client).enqueue(mail([always]))
    env = env_for(redis_url, smtp_url(sink.port), DISPATCH_RETRY_BASE="0.05", DISPATCH_RETRY_MAX_ATTEMPTS="3")
    start_worker(env)
    wait_until(
        lambda: state_of(redis_client, done.id) in ("delivered", "failed", "unknown"),
        40,
        message="the retry schedule never ended",
    )
    shown = status(redis_url, done.id)
    assert shown["state"] == "failed"
    assert shown["attempts"] == 3 and shown["next_attempt_at"] is None
    history = [h for h in shown["history"] if "event" not in h]
    assert [h["attempt"] for h in history] == [1, 2, 3]
    assert all(h["outcomes"] == {always: "transient"} for h in history)
    assert [h["at"] for h in history] == sorted(h["at"] for h in history)
    reason = shown["reason"]
    assert (reason["kind"], reason["stage"], reason["code"], reason["enhanced"]) == (
        "exhausted",
        "rcpt",
        451,
        "4.3.0",
    )
    assert shown["recipients"][always]["status"] == "transient"
    assert shown["transcript"], "the failure record keeps the last attempt's transcript"
    assert any("RCPT TO:<always-busy@example.test>" in str(entry) for entry in shown["transcript"])
    rcpts = [line for _, line in sink.commands if line.upper().startswith("RCPT")]
    assert len(rcpts) == 3, f"expected exactly 3 attempts at the server, saw {rcpts}"


def test_max_age_stops_the_schedule_too(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    always = "always-busy@example.test"
    sink = smtp_server(rules={always: Rule(451, "4.3.0 try later")})
    done = Producer(redis_client).enqueue(mail([always]))
    # Many attempts allowed, but a maximum age shorter than the first delay: the 2nd attempt is the last.
    env = env_for(
        redis_url,
        smtp_url(sink.port),
        DISPATCH_RETRY_BASE="0.05",
        DISPATCH_RETRY_MAX_ATTEMPTS="50",
        DISPATCH_RETRY_MAX_AGE="0.5",
    )
    start_worker(env)
    wait_until(
        lambda: state_of(redis_client, done.id) in ("delivered", "failed", "unknown"),
        30,
        message="the retry schedule never ended",
    )
    rec = load(redis_client, done.id)
    assert rec.state == "failed" and rec.status()["reason"]["kind"] == "exhausted"
    assert 2 <= rec.attempts < 50


def test_server_hint_try_again_in_2_seconds_is_honoured(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    grey = "grey@example.test"
    sink = smtp_server(rules={grey: Rule(450, "4.7.1 Greylisted, try again in 2 seconds", times=1)})
    done = Producer(redis_client).enqueue(mail([grey]))
    # Backoff alone would pick a delay anywhere in [0, 3600) s: only the hint gives 2 s.
    env = env_for(redis_url, smtp_url(sink.port), DISPATCH_RETRY_BASE="3600", DISPATCH_RETRY_MAX_DELAY="3600")
    runner = InProcess(redis_client, env)
    try:
        assert runner.attempt(done.id)["state"] == "deferred"
    finally:
        runner.close()
    rec = load(redis_client, done.id)
    first_at = attempts_made(rec)[0]["at"]
    assert rec.next_attempt_at is not None
    assert abs(rec.next_attempt_at - first_at - 2.0) < 0.05, rec.next_attempt_at - first_at
    # A worker's scheduler then releases it no earlier than the hint and delivers it.
    start_worker(env)
    wait_until(lambda: state_of(redis_client, done.id) == "delivered", 30, message="never delivered")
    rec = load(redis_client, done.id)
    second_at = attempts_made(rec)[1]["at"]
    assert 2.0 <= second_at - first_at < 2.0 + 5.0
    assert deliveries(sink.messages)[(done.message_id, grey)] == 1
