"""The policy table, stage by stage, against a scripted server: each reply or fault gives its action.

One attempt at a time runs in this process (``delivery.jobs.Attempt`` with a real ``Runtime``, Redis
and SMTP server; no worker): attempt 1 meets the fault; the server is then healed and the attempt the
record now expects (the rq job it scheduled) runs, showing what a retry does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC
from typing import Any

import pytest
import redis
from retrykit import InProcess, attempts_made, deliveries, env_for, load, mail, smtp_url, unanswered
from rq import Queue
from rq.serializers import JSONSerializer
from servers import Fault, Rule, ScriptedSmtpServer

from dispatcher.queue.producer import Producer, attempt_job_id
from dispatcher.queue.store import SendStore

Scripted = Callable[..., ScriptedSmtpServer]
STAGES = ("mail", "rcpt", "data", "data_end")
RCPT = "rcpt@example.test"


@pytest.fixture
def attempts(redis_client: redis.Redis) -> Iterator[Callable[..., InProcess]]:
    made: list[InProcess] = []

    def make(port: int, **settings: str) -> InProcess:
        # Backoff base 60 s: a deferral is always *scheduled* (never due at once), so it shows in the record.
        policy = {"DISPATCH_RETRY_BASE": "60", "DISPATCH_RETRY_MAX_DELAY": "3600", **settings}
        env = env_for("redis://unused", smtp_url(port, timeout=1), **policy)
        runner = InProcess(redis_client, env)
        made.append(runner)
        return runner

    yield make
    for runner in made:
        runner.close()


def enqueue(redis_client: redis.Redis, to: tuple[str, ...] = (RCPT,)) -> tuple[str, str]:
    done = Producer(redis_client).enqueue(mail(to))
    return done.id, done.message_id


def scheduled_at(redis_client: redis.Redis, job_id: str) -> float | None:
    registry = Queue(
        "mail-default", connection=redis_client, serializer=JSONSerializer
    ).scheduled_job_registry
    if job_id not in registry.get_job_ids():
        return None
    return registry.get_scheduled_time(job_id).replace(tzinfo=UTC).timestamp()


def queued_jobs(redis_client: redis.Redis) -> list[str]:
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    return list(queue.get_job_ids()) + list(queue.scheduled_job_registry.get_job_ids())


def assert_deferred_then_delivered(
    redis_client: redis.Redis,
    server: ScriptedSmtpServer,
    runner: InProcess,
    send_id: str,
    mid: str,
    stage: str,
    code: int | None,
    spent: int = 1,
) -> None:
    """``spent``: 0 when nothing of the message was offered (a 421 or a drop before MAIL got its reply:
    the attempt is given back, issue 13), else 1."""
    rec = load(redis_client, send_id)
    assert rec.state == "deferred", rec.status()
    assert rec.attempts == spent
    outcome = rec.status()["recipients"][RCPT]
    assert (outcome["status"], outcome["stage"], outcome["code"]) == ("transient", stage, code), outcome
    at = attempts_made(rec)[-1]["at"]
    assert rec.next_attempt_at is not None and at < rec.next_attempt_at <= at + 60
    assert rec.rq_job == attempt_job_id(send_id, 0, spent + 1)
    when = scheduled_at(redis_client, rec.rq_job)
    assert when is not None and abs(when - rec.next_attempt_at) <= 1.0, "retry not scheduled in rq"
    assert rec.status()["reason"]["stage"] == stage

    server.faults = {}  # healed: the retry goes through
    assert runner.attempt(send_id)["state"] == "delivered"
    rec = load(redis_client, send_id)
    assert (rec.state, rec.attempts, rec.status_of(RCPT)) == ("delivered", spent + 1, "accepted")
    assert rec.next_attempt_at is None and rec.status()["reason"] is None
    assert deliveries(server.messages, only_final=b"250")[(mid, RCPT)] == 1


@pytest.mark.parametrize("stage", STAGES)
def test_4xx_defers_with_a_scheduled_retry_that_delivers(
    stage: str, scripted_server: Scripted, attempts: Callable[..., InProcess], redis_client: redis.Redis
) -> None:
    server = scripted_server(faults={stage: Fault("reply", b"451 4.3.0 local problem, later\r\n")})
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client)
    assert runner.attempt(send_id)["state"] == "deferred"
    rec = load(redis_client, send_id)
    assert rec.status()["recipients"][RCPT]["enhanced"] == "4.3.0"
    assert rec.status()["reason"]["code"] == 451
    assert_deferred_then_delivered(redis_client, server, runner, send_id, mid, stage, 451)


@pytest.mark.parametrize(
    ("stage", "reply", "kind"),
    [
        ("mail", b"553 5.1.8 sender rejected\r\n", "message"),
        ("rcpt", b"550 5.1.1 no such user\r\n", "recipient"),
        ("data", b"554 5.7.1 transaction refused\r\n", "message"),
        ("data_end", b"552 5.3.4 message too big for policy\r\n", "message"),
    ],
)
def test_5xx_fails_now_with_the_reply_kept_and_no_retry(
    stage: str,
    reply: bytes,
    kind: str,
    scripted_server: Scripted,
    attempts: Callable[..., InProcess],
    redis_client: redis.Redis,
) -> None:
    server = scripted_server(faults={stage: Fault("reply", reply)})
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client)
    queued_before = queued_jobs(redis_client)
    assert runner.attempt(send_id)["state"] == "failed"
    rec = load(redis_client, send_id)
    code, enhanced = int(reply[:3]), reply[4:9].decode()
    outcome = rec.status()["recipients"][RCPT]
    assert (outcome["status"], outcome["stage"], outcome["code"], outcome["enhanced"]) == (
        "permanent",
        stage,
        code,
        enhanced,
    )
    assert reply[10:-2].decode() in outcome["text"]
    reason = rec.status()["reason"]
    assert (reason["kind"], reason["stage"], reason["code"], reason["enhanced"]) == (
        kind,
        stage,
        code,
        enhanced,
    )
    assert rec.next_attempt_at is None and rec.attempts == 1
    assert rec.rq_job == send_id, "a new attempt was scheduled for a permanent failure"
    assert queued_jobs(redis_client) == queued_before, "a retry was queued"
    assert rec.status()["transcript"], "the failure record keeps the last attempt's transcript"
    # The same rq job delivered again (a requeue by hand) changes nothing and sends nothing.
    server.faults = {}
    assert runner.attempt(send_id).get("stale_job") is True
    assert deliveries(server.messages, only_final=b"250")[(mid, RCPT)] == 0


def test_421_before_mail_reconnects_without_spending_the_attempt(
    scripted_server: Scripted, attempts: Callable[..., InProcess], redis_client: redis.Redis
) -> None:
    server = scripted_server(
        faults={"mail": Fault("reply", b"421 4.3.2 shutting down\r\n")}, faults_on_connection=1
    )
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client)
    assert runner.attempt(send_id)["state"] == "delivered"
    rec = load(redis_client, send_id)
    assert rec.attempts == 1 and server.connection_count == 2
    assert deliveries(server.messages, only_final=b"250")[(mid, RCPT)] == 1


@pytest.mark.parametrize("stage", STAGES)
def test_421_defers_and_the_retry_delivers(
    stage: str, scripted_server: Scripted, attempts: Callable[..., InProcess], redis_client: redis.Redis
) -> None:
    server = scripted_server(faults={stage: Fault("reply", b"421 4.3.2 closing channel\r\n")})
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client)
    assert runner.attempt(send_id)["state"] == "deferred"
    # Before MAIL is accepted a 421 earns exactly one free reconnect; after it, none.
    assert server.connection_count == (2 if stage == "mail" else 1)
    assert_deferred_then_delivered(
        redis_client, server, runner, send_id, mid, stage, 421, spent=0 if stage == "mail" else 1
    )


@pytest.mark.parametrize("action", ["drop", "hang"])
@pytest.mark.parametrize("stage", ["mail", "rcpt", "data"])
def test_drop_or_hang_before_the_final_dot_defers(
    action: str,
    stage: str,
    scripted_server: Scripted,
    attempts: Callable[..., InProcess],
    redis_client: redis.Redis,
) -> None:
    server = scripted_server(faults={stage: Fault(action)})  # type: ignore[arg-type]
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client)
    assert runner.attempt(send_id)["state"] == "deferred"
    assert not server.messages or not message_ids(server), "no message data may have gone out"
    assert_deferred_then_delivered(
        redis_client, server, runner, send_id, mid, stage, None, spent=0 if stage == "mail" else 1
    )


def message_ids(server: ScriptedSmtpServer) -> list[tuple[str, str]]:
    return list(deliveries(server.messages))


@pytest.mark.parametrize("action", ["drop", "hang"])
def test_no_reply_after_the_final_dot_is_unknown_and_not_resent(
    action: str, scripted_server: Scripted, attempts: Callable[..., InProcess], redis_client: redis.Redis
) -> None:
    server = scripted_server(faults={"data_end": Fault(action)})  # type: ignore[arg-type]
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client)
    queued_before = queued_jobs(redis_client)
    assert runner.attempt(send_id)["state"] == "unknown"
    rec = load(redis_client, send_id)
    outcome = rec.status()["recipients"][RCPT]
    assert (outcome["status"], outcome["stage"], outcome["kind"]) == ("unknown", "data_end", "unknown")
    assert rec.status()["reason"]["kind"] == "unknown"
    assert rec.next_attempt_at is None and rec.rq_job == send_id
    assert queued_jobs(redis_client) == queued_before, "a retry was queued"
    assert unanswered(server.messages)[(mid, RCPT)] == 1
    server.faults = {}
    assert runner.attempt(send_id).get("stale_job") is True
    assert deliveries(server.messages, only_final=b"")[(mid, RCPT)] == 0
    assert len(deliveries(server.messages)) == 1, "the unknown message was sent again"


@pytest.mark.parametrize("action", ["drop", "hang"])
def test_resend_unknown_true_retries_after_the_final_dot(
    action: str, scripted_server: Scripted, attempts: Callable[..., InProcess], redis_client: redis.Redis
) -> None:
    server = scripted_server(faults={"data_end": Fault(action)})  # type: ignore[arg-type]
    runner = attempts(server.port, DISPATCH_RESEND_UNKNOWN="true")
    send_id, mid = enqueue(redis_client)
    assert runner.attempt(send_id)["state"] == "deferred"
    assert unanswered(server.messages)[(mid, RCPT)] == 1
    assert_deferred_then_delivered(redis_client, server, runner, send_id, mid, "data_end", None)


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        (b"450 4.2.0 mailbox busy\r\n", "transient"),
        (b"550 5.1.1 no such user\r\n", "permanent"),
    ],
)
def test_no_reply_after_the_dot_is_unknown_only_for_recipients_the_data_went_to(
    refusal: bytes,
    expected: str,
    scripted_server: Scripted,
    attempts: Callable[..., InProcess],
    redis_client: redis.Redis,
) -> None:
    took, refused = "took@example.test", "refused@example.test"
    server = scripted_server(faults={"data_end": Fault("drop")}, per_recipient={refused: refusal})
    runner = attempts(server.port)
    send_id, mid = enqueue(redis_client, (took, refused))
    runner.attempt(send_id)
    assert unanswered(server.messages)[(mid, took)] == 1
    assert unanswered(server.messages)[(mid, refused)] == 0, "the data never went to the refused recipient"
    rec = load(redis_client, send_id)
    assert rec.status()["recipients"][took]["status"] == "unknown"
    assert (rec.outcomes[refused].status, rec.outcomes[refused].stage) == (expected, "rcpt")
    assert rec.status()["recipients"][refused]["code"] == int(refusal[:3])
    assert rec.state == ("deferred" if expected == "transient" else "unknown")


def test_partial_deferral_due_at_once_records_the_accepted_recipient(
    smtp_server: Callable[..., Any], attempts: Callable[..., InProcess], redis_client: redis.Redis
) -> None:
    took, busy = "took@example.test", "busy@example.test"
    sink = smtp_server(rules={busy: Rule(450, "4.2.0 busy", times=1)})
    runner = attempts(sink.port, DISPATCH_RETRY_BASE="0")  # full jitter over [0, 0]: retry at once
    send_id, mid = enqueue(redis_client, (took, busy))
    assert runner.attempt(send_id)["state"] == "deferred"
    rec = load(redis_client, send_id)
    assert took in SendStore(redis_client).never_again(rec)
    assert rec.next_attempt_at is None and rec.rq_job == attempt_job_id(send_id, 0, 2)
    assert rec.rq_job in queued_jobs(redis_client)
    assert runner.attempt(send_id)["state"] == "delivered"
    counts = deliveries(sink.messages)
    assert counts[(mid, took)] == 1 and counts[(mid, busy)] == 1
