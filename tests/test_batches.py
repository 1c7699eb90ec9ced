"""Sends enqueued together share rq jobs; a stopped or dead batch hands back its unstarted sends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from email import message_from_bytes
from pathlib import Path

import pytest
import redis
from rq import Queue
from rq.serializers import JSONSerializer
from servers import Fault, ScriptedSmtpServer

from dispatcher.delivery.jobs import Attempt
from dispatcher.dev.devsink import DevSink
from dispatcher.queue.keys import INFLIGHT
from dispatcher.queue.producer import BATCH_FUNCTION, JOB_BATCH_SIZE, Producer
from dispatcher.queue.recovery import reap_abandoned, requeue_unstarted
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent


def mails(n: int) -> list[dict[str, str]]:
    return [{"from": "app@example.com", "to": f"user{i}@example.org", "subject": f"batch {i}", "text": "hi"}
            for i in range(n)]  # fmt: skip


def run_worker_burst(redis_url: str, port: int) -> None:
    env = {**os.environ, "REDIS_URL": redis_url, "SMTP_URL": f"smtp://127.0.0.1:{port}?tls=off",
           "DISPATCH_LOG_FORMAT": "json"}  # fmt: skip
    done = subprocess.run([sys.executable, "worker.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                          timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-2000:]


def delivered_subjects(sink: DevSink) -> list[str]:
    return [str(message_from_bytes(m.data)["Subject"]) for m in sink.messages]


def test_enqueue_many_packs_sends_into_jobs_of_the_batch_size(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    results = Producer(connection).enqueue_many(mails(JOB_BATCH_SIZE * 2 + 5))
    queue = Queue("mail-default", connection=connection, serializer=JSONSerializer)
    jobs = queue.get_jobs()
    assert [len(job.args[0]) for job in jobs] == [JOB_BATCH_SIZE, JOB_BATCH_SIZE, 5]
    assert all(job.func_name == BATCH_FUNCTION for job in jobs)
    store = SendStore(connection)
    by_job = {send_id for job in jobs for send_id in job.args[0]}
    assert by_job == {r.id for r in results if not isinstance(r, Exception)}
    assert store.load(jobs[0].args[0][0]).rq_job == jobs[0].id  # type: ignore[union-attr]


def test_a_batch_delivers_every_send_once_on_one_connection(
    redis_url: str, smtp_server: Callable[..., DevSink]
) -> None:
    sink = smtp_server()
    Producer(redis.Redis.from_url(redis_url)).enqueue_many(mails(45))
    run_worker_burst(redis_url, sink.port)
    assert sorted(delivered_subjects(sink)) == sorted(f"batch {i}" for i in range(45))
    assert sink.connections == 1


def test_sends_handed_back_by_a_stopped_batch_are_delivered_once_by_their_own_jobs(
    redis_url: str, smtp_server: Callable[..., DevSink]
) -> None:
    connection = redis.Redis.from_url(redis_url)
    Producer(connection).enqueue_many(mails(6))
    job = Queue("mail-default", connection=connection, serializer=JSONSerializer).get_jobs()[0]
    handed_back = job.args[0][3:]
    assert requeue_unstarted(connection, handed_back, job.id) == handed_back
    store = SendStore(connection)
    assert all(store.load(s).rq_job != job.id for s in handed_back)  # type: ignore[union-attr]
    sink = smtp_server()
    # The old batch job reaching a handed-back send must leave it to the send's own job.
    settings = load_settings({"SMTP_URL": f"smtp://127.0.0.1:{sink.port}?tls=off"}, need_routes=True)
    stale = Attempt(Runtime(settings), connection, job.id, handed_back[0]).run()
    assert stale.get("stale_job") is True
    assert sink.messages == []
    run_worker_burst(redis_url, sink.port)
    assert sorted(delivered_subjects(sink)) == sorted(f"batch {i}" for i in range(6))


def test_the_reaper_requeues_the_unfinished_sends_of_a_dead_batch(redis_url: str) -> None:
    connection = redis.Redis.from_url(redis_url)
    Producer(connection).enqueue_many(mails(3))
    job = Queue("mail-default", connection=connection, serializer=JSONSerializer).get_jobs()[0]
    ids = list(job.args[0])
    expired = time.time() - 1
    connection.zadd(INFLIGHT, dict.fromkeys(ids, expired))
    assert sorted(reap_abandoned(connection)) == sorted(ids)
    assert connection.zcard(INFLIGHT) == 0
    store = SendStore(connection)
    assert {store.load(s).rq_job for s in ids}.isdisjoint({job.id})  # type: ignore[union-attr]
    assert reap_abandoned(connection) == []


def _mails_from_distinct_senders(n: int, refused_at: int | None = None) -> list[dict[str, str]]:
    return [
        {
            "from": f"app{i}@example.com",
            "to": "nobody@example.org" if i == refused_at else f"user{i}@example.org",
            "subject": f"strict {i}",
            "text": "hi",
        }
        for i in range(n)
    ]


def _accepted_at(server: ScriptedSmtpServer) -> list[tuple[str, str]]:
    """(envelope sender, Subject) of every message the server accepted."""
    return [
        (m.mail_from, str(message_from_bytes(m.data)["Subject"]))
        for m in server.messages
        if m.final_reply is not None and m.final_reply.startswith(b"2")
    ]


@pytest.mark.parametrize(
    ("strictness", "keywords"),
    [("haraka", ["PIPELINING", "8BITMIME", "SIZE 10000000"]),
     ("exim", ["PIPELINING", "CHUNKING", "8BITMIME", "SIZE 10000000"]),
     ("exim", ["PIPELINING", "8BITMIME", "SIZE 10000000"])],
    ids=["haraka", "exim-chunking", "exim-data"],
)  # fmt: skip
def test_batches_on_strict_servers_deliver_each_mail_once_under_its_own_sender(
    redis_url: str, scripted_server: Callable[..., ScriptedSmtpServer], strictness: str, keywords: list[str]
) -> None:
    """Through the queue and a real worker: every batch is a stream (issue 11's two observed failures)."""
    refused_at = 7 if strictness == "exim" else None
    server = scripted_server(
        ehlo_keywords=keywords,
        strictness=strictness,
        per_recipient={"nobody@example.org": b"550 5.1.1 no such user\r\n"},
    )
    connection = redis.Redis.from_url(redis_url)
    results = Producer(connection).enqueue_many(_mails_from_distinct_senders(45, refused_at))
    run_worker_burst(redis_url, server.port)
    expected = [(f"app{i}@example.com", f"strict {i}") for i in range(45) if i != refused_at]
    assert sorted(_accepted_at(server)) == sorted(expected)
    store = SendStore(connection)
    states = {}
    for index, result in enumerate(results):
        assert not isinstance(result, Exception)
        record = store.load(result.id)
        assert record is not None
        states[index] = record.state
    assert {i: s for i, s in states.items() if s != "delivered"} == (
        {refused_at: "failed"} if refused_at is not None else {}
    )


def test_a_421_at_mail_in_a_stream_charges_no_message_an_attempt(
    redis_url: str, scripted_server: Callable[..., ScriptedSmtpServer]
) -> None:
    """Issue 13: a 421 at MAIL failed every message on the wire. Nothing of those was offered: each is
    delivered on the next connection or deferred with its attempt given back — none failed, none charged."""
    server = scripted_server(
        ehlo_keywords=["PIPELINING", "8BITMIME", "SIZE 10000000"],
        faults={"mail": Fault("reply", b"421 4.7.0 too many messages, closing\r\n", occurrence=3)},
        faults_on_connection=1,
    )
    connection = redis.Redis.from_url(redis_url)
    results = Producer(connection).enqueue_many(_mails_from_distinct_senders(10))
    run_worker_burst(redis_url, server.port)
    store = SendStore(connection)
    records = [store.load(r.id) for r in results if not isinstance(r, Exception)]
    assert all(rec is not None for rec in records)
    states = {(rec.state, rec.attempts) for rec in records if rec is not None}
    assert states <= {("delivered", 1), ("deferred", 0)}, states
    assert server.connection_count >= 2


@pytest.mark.parametrize(
    "greeting", [b"421 4.3.2 busy, try later\r\n", b"554 5.3.2 not accepting mail\r\n"], ids=["421", "554"]
)
def test_route_trouble_at_the_greeting_of_a_stream_charges_no_message(
    greeting: bytes, redis_url: str, scripted_server: Callable[..., ScriptedSmtpServer]
) -> None:
    """Issue 13: on the stream path a connection that failed before MAIL was the messages' outcome, with
    no reconnect, and a 5xx greeting failed them permanently. It is the route's trouble: each message of
    the batch is delivered on a later connection or deferred with its attempt given back, none failed."""
    server = scripted_server(faults={"greeting": Fault("reply", greeting)}, faults_on_connection=1)
    connection = redis.Redis.from_url(redis_url)
    results = Producer(connection).enqueue_many(mails(5))
    run_worker_burst(redis_url, server.port)
    store = SendStore(connection)
    records = [store.load(r.id) for r in results if not isinstance(r, Exception)]
    assert len(records) == 5 and all(rec is not None for rec in records)
    states = {(rec.state, rec.attempts) for rec in records if rec is not None}
    assert states <= {("delivered", 1), ("deferred", 0)}, states
    kinds = {o.kind for rec in records if rec is not None and rec.state == "deferred"
             for o in rec.outcomes.values()}  # fmt: skip
    assert kinds <= {"route"}, kinds
