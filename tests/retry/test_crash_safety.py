"""Crash safety: a worker killed with ``kill -9`` mid-send, Redis restarted (AOF), Redis briefly away."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis
from helpers import wait_until
from retrykit import (
    StartWorker,
    deliveries,
    env_for,
    load,
    mail,
    run_cli,
    smtp_url,
    state_of,
    unanswered,
)
from servers import Fault, RecordingSmtpServer, RedisServer, ScriptedSmtpServer

from dispatcher.errors import QueueUnavailable
from dispatcher.queue.producer import Producer, connect

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]
MakeRedis = Callable[..., RedisServer]


def test_kill_9_before_the_data_resumes_for_recipients_not_yet_accepted(
    scripted_server: Scripted, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    first, second = "first@example.test", "second@example.test"
    # Connection 1: the 2nd RCPT gets 450 (attempt 1 delivers to `first` only); attempt 2's MAIL is never
    # answered: the worker waits there, before any data, until it is killed.
    server = scripted_server(
        faults={
            "rcpt": Fault("reply", b"450 4.2.0 busy\r\n", occurrence=2),
            "mail": Fault("hang", occurrence=2),
        },
        faults_on_connection=1,
    )
    done = Producer(redis_client).enqueue(mail([first, second]))
    env = env_for(redis_url, smtp_url(server.port, timeout=120),
                  DISPATCH_LEASE_SECONDS="3", DISPATCH_MAINTENANCE_INTERVAL="1")  # fmt: skip
    victim = start_worker(env)
    wait_until(lambda: _mails_sent(server) == 2, 30, message="the worker never reached attempt 2's MAIL")
    assert load(redis_client, done.id).state == "sending"
    assert load(redis_client, done.id).data_out is None  # nothing of attempt 2's data went out
    victim.kill9()
    killed_at = time.monotonic()
    start_worker(env)  # the survivor: its maintenance finds the expired lease and requeues the send
    wait_until(
        lambda: state_of(redis_client, done.id) == "delivered",
        90,
        message="the send did not resume within 90 s of kill -9",
    )
    print(f"resumed and delivered {time.monotonic() - killed_at:.1f} s after kill -9")
    rec = load(redis_client, done.id)
    assert any(h.get("event") == "worker_lost" for h in rec.status()["history"])
    accepted = deliveries(server.messages, only_final=b"250")
    assert accepted[(done.message_id, first)] == 1
    assert accepted[(done.message_id, second)] == 1
    rcpts = [line for line in server.lines() if line.upper().startswith(b"RCPT")]
    assert sum(first.encode() in line for line in rcpts) == 1, "an accepted recipient was sent to again"


def test_kill_9_after_the_final_dot_leaves_the_send_unknown_and_never_resends_it(
    scripted_server: Scripted, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    """Issue 13: killed past the final dot, the mail was delivered twice (recovery resent it as never
    sent). The record says the data went out before its first byte did: the send ends *unknown*."""
    recipients = [f"r{i}@example.test" for i in range(3)]
    server = scripted_server(faults={"data_end": Fault("hang")}, faults_on_connection=1)
    done = Producer(redis_client).enqueue(mail(recipients))
    env = env_for(redis_url, smtp_url(server.port, timeout=120),
                  DISPATCH_LEASE_SECONDS="3", DISPATCH_MAINTENANCE_INTERVAL="1")  # fmt: skip
    victim = start_worker(env)
    wait_until(
        lambda: unanswered(server.messages)[(done.message_id, recipients[0])] == 1,
        30,
        message="the worker never reached the stalled final dot",
    )
    assert load(redis_client, done.id).data_out == 1
    victim.kill9()
    start_worker(env)
    wait_until(lambda: state_of(redis_client, done.id) == "unknown", 60, message="not marked unknown")
    rec = load(redis_client, done.id)
    assert [rec.status()["recipients"][r]["status"] for r in recipients] == ["unknown"] * 3
    assert "may have been delivered" in rec.status()["reason"]["text"]
    assert rec.data_out is None
    assert any(h.get("event") == "worker_lost_after_data" for h in rec.status()["history"])
    # Nothing was sent again: one MAIL on the whole server, on the first connection.
    assert _mails_sent(server) == 1
    assert len(server.messages) == 1


def _mails_sent(server: ScriptedSmtpServer) -> int:
    return sum(1 for line in server.lines() if line.upper().startswith(b"MAIL"))


def test_redis_restart_with_aof_loses_no_job(
    make_redis_server: MakeRedis, smtp_server: Sink, start_worker: StartWorker
) -> None:
    server = make_redis_server(appendonly=True)
    sink = smtp_server()
    client = server.client()
    try:
        producer = Producer(client)
        sends = [
            producer.enqueue(mail([f"r{i}@example.test"] + ([f"s{i}@example.test"] if i % 2 else [])))
            for i in range(30)
        ]
    finally:
        client.close()
    server.restart()
    start_worker(env_for(server.url, smtp_url(sink.port)))
    client = server.client()
    try:
        wait_until(
            lambda: all(state_of(client, s.id) == "delivered" for s in sends),
            60,
            interval=0.1,
            message="jobs enqueued before the restart were not all delivered",
        )
    finally:
        client.close()
    counts = deliveries(sink.messages)
    expected = {(s.message_id, f"r{i}@example.test") for i, s in enumerate(sends)}
    expected |= {(s.message_id, f"s{i}@example.test") for i, s in enumerate(sends) if i % 2}
    assert set(counts) == expected and set(counts.values()) == {1}


def test_redis_briefly_unreachable_workers_wait_and_producers_get_a_clear_error(
    make_redis_server: MakeRedis, smtp_server: Sink, start_worker: StartWorker
) -> None:
    server = make_redis_server(appendonly=True)
    sink = smtp_server()
    client = connect(server.url)
    producer = Producer(client)
    worker = start_worker(env_for(server.url, smtp_url(sink.port)))
    before = producer.enqueue(mail(["before@example.test"]))
    wait_until(lambda: state_of(client, before.id) == "delivered", 30, message="first mail not delivered")

    server.stop()
    with pytest.raises(QueueUnavailable, match="Redis is unreachable, nothing was enqueued"):
        producer.enqueue(mail(["during@example.test"]))
    cli = run_cli(
        server.url,
        "send",
        "--from",
        "a@dispatch.test",
        "--to",
        "during-cli@example.test",
        "--subject",
        "s",
        "--text",
        "t",
    )
    assert cli.returncode == 3 and "Redis is unreachable" in cli.stderr, (cli.returncode, cli.stderr)
    assert cli.stdout == ""
    wait_until(
        lambda: "could not connect to redis" in worker.log_text().lower(),
        30,
        message="the worker never noticed that Redis was gone",
    )
    assert worker.process.poll() is None, "the worker exited while Redis was away"

    server.restart()
    after = producer.enqueue(mail(["after@example.test"]))
    wait_until(
        lambda: state_of(client, after.id) == "delivered",
        60,
        message="the worker did not reconnect and deliver",
    )
    assert worker.process.poll() is None
    client.close()
    received = {rcpt for m in sink.messages for rcpt in m.rcpt_tos}
    assert received == {"before@example.test", "after@example.test"}
