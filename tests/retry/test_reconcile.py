"""Every send that is not final has an owner (issue 13, invariant 1): the reconciler finds the ones that lost
theirs — a job popped the way rq pops several queues (BLPOP) by a worker that died before it began, or one
rq had already recorded as started when its worker died — and gives each a job of its own, never one that
a live owner holds."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from helpers import wait_until
from retrykit import StartWorker, deliveries, env_for, load, mail, smtp_url, state_of
from rq import Queue, SimpleWorker
from rq.serializers import JSONSerializer
from servers import RecordingSmtpServer

from dispatcher.mail.fields import PRIORITIES
from dispatcher.queue.keys import INFLIGHT
from dispatcher.queue.producer import Producer, rq_queue
from dispatcher.queue.reconcile import owned_jobs, reconcile

Sink = Callable[..., RecordingSmtpServer]


def pop_like_a_dying_worker(client: redis.Redis, priority: str = "default") -> str:
    """What rq's BLPOP over several queues does before the worker records anything: the job id leaves the
    queue list, and the worker is gone."""
    job_id = client.lpop(rq_queue(client, priority).key)
    assert job_id is not None, "nothing queued"
    return job_id.decode()


def start_like_a_dying_worker(client: redis.Redis) -> str:
    """What rq does with a job before our function runs: it leaves the queue list and is recorded in rq's
    started registry (an execution of this worker) — and the worker is killed there, before the attempt
    takes its lease. Seen in the chaos run: the send then waited for rq's job timeout (an hour)."""
    queues = [rq_queue(client, p) for p in PRIORITIES]  # a worker's queues: rq pops them with (BL)POP
    popped = Queue.dequeue_any(queues, None, connection=client, serializer=JSONSerializer)
    assert popped is not None, "nothing queued"
    job = popped[0]
    SimpleWorker(queues, connection=client, serializer=JSONSerializer).prepare_execution(job)
    return str(job.id)


def test_a_job_rq_recorded_as_started_by_a_worker_that_died_gets_a_new_owner(
    redis_client: redis.Redis,
) -> None:
    done = Producer(redis_client).enqueue(mail(["started@example.test"]))
    lost = start_like_a_dying_worker(redis_client)
    assert lost in owned_jobs(redis_client)  # rq's started registry holds it: its worker may be running it
    assert reconcile(redis_client, older_than=60) == []  # too recent: the attempt may still be beginning
    assert reconcile(redis_client, older_than=60, now=time.time() + 61) == [done.id]
    rec = load(redis_client, done.id)
    assert rec.state == "queued" and rec.rq_job != lost and rec.history[-1].details["lost_job"] == lost


def test_a_popped_job_whose_worker_died_gets_a_new_owner(redis_client: redis.Redis) -> None:
    done = Producer(redis_client).enqueue(mail(["lost@example.test"]))
    lost = pop_like_a_dying_worker(redis_client)
    assert lost not in owned_jobs(redis_client)
    assert reconcile(redis_client, older_than=60) == []  # too recent: it may still be on its way
    assert reconcile(redis_client, older_than=60, now=time.time() + 61) == [done.id]
    rec = load(redis_client, done.id)
    assert rec.state == "queued" and rec.rq_job != lost and rec.rq_job in owned_jobs(redis_client)
    last = rec.status()["history"][-1]
    assert last["event"] == "reconciled" and last["lost_job"] == lost
    assert reconcile(redis_client, older_than=60, now=time.time() + 61) == []  # owned again: nothing to do


def test_a_lost_batch_job_gives_each_of_its_sends_a_job(redis_client: redis.Redis) -> None:
    sends = Producer(redis_client).enqueue_many([mail([f"b{i}@example.test"]) for i in range(5)])
    pop_like_a_dying_worker(redis_client)
    adopted = reconcile(redis_client, older_than=1, now=time.time() + 2)
    assert sorted(adopted) == sorted(s.id for s in sends if not isinstance(s, Exception))


def test_sends_with_a_live_owner_are_left_alone(redis_client: redis.Redis) -> None:
    producer = Producer(redis_client)
    leased = producer.enqueue(mail(["leased@example.test"]))
    waiting = producer.enqueue(mail(["waiting@example.test"]))
    scheduled = producer.enqueue(mail(["later@example.test"], send_at=time.time() + 3600))
    pop_like_a_dying_worker(redis_client)  # `leased`'s job: popped, but a live worker holds its lease
    redis_client.zadd(INFLIGHT, {leased.id: time.time() + 30})
    assert reconcile(redis_client, older_than=1, now=time.time() + 2) == []
    assert load(redis_client, waiting.id).rq_job in owned_jobs(redis_client)  # still in the queue list
    assert load(redis_client, scheduled.id).rq_job in owned_jobs(redis_client)  # in rq's scheduled registry


def test_end_to_end_the_worker_delivers_a_mail_lost_in_the_dequeue_window(
    redis_url: str, redis_client: redis.Redis, smtp_server: Sink, start_worker: StartWorker
) -> None:
    sink = smtp_server()
    single = Producer(redis_client).enqueue(mail(["single@example.test"]))
    batch = Producer(redis_client).enqueue_many([mail([f"batch{i}@example.test"]) for i in range(3)])
    pop_like_a_dying_worker(redis_client)  # the single mail's job
    pop_like_a_dying_worker(redis_client)  # the batch's job
    ids = [single.id, *(s.id for s in batch if not isinstance(s, Exception))]
    settings = {"DISPATCH_RECONCILE_AFTER": "1", "DISPATCH_MAINTENANCE_INTERVAL": "1"}
    start_worker(env_for(redis_url, smtp_url(sink.port), **settings))
    wait_until(
        lambda: all(state_of(redis_client, i) == "delivered" for i in ids),
        40,
        message="mail lost in the dequeue window was never delivered",
    )
    counts = deliveries(sink.messages)
    assert sorted(counts.values()) == [1, 1, 1, 1]


def test_a_worker_stalled_after_reading_its_send_does_not_send_it_once_the_reconciler_moved_it_on(
    redis_client: redis.Redis, smtp_server: Sink, redis_url: str
) -> None:
    """The other side of a reconciled send: the worker that read the record (with its old job) but stalled
    before it began — longer than the reconcile delay — must not send it too. The begin is conditional on
    the record still naming the job and state that worker read (one script, no window): it finds the send
    moved on, takes no lease and opens no connection; the new job delivers it once."""
    from dispatcher.delivery.attempt import Attempt
    from dispatcher.settings import load_settings
    from dispatcher.worker.runtime import Runtime

    sink = smtp_server()
    done = Producer(redis_client).enqueue(mail(["stall@example.test"]))
    runtime = Runtime(load_settings(env_for(redis_url, smtp_url(sink.port)), need_routes=True))
    old_job = pop_like_a_dying_worker(redis_client)

    class StalledBetweenReadAndBegin(Attempt):
        def bind(self) -> None:  # runs after the record was read, before the attempt begins
            super().bind()
            assert reconcile(redis_client, older_than=0, now=time.time() + 1) == [done.id]

    try:
        stalled = StalledBetweenReadAndBegin(runtime, redis_client, old_job, done.id).run()
        assert stalled.get("stale_job") is True, stalled
        rec = load(redis_client, done.id)
        assert rec.state == "queued" and rec.attempts == 0 and rec.rq_job != old_job
        assert redis_client.zscore(INFLIGHT, done.id) is None
        assert sink.messages == [] and runtime.clients.get("default") is None  # no connection was opened
        assert Attempt(runtime, redis_client, rec.rq_job or "", done.id).run()["state"] == "delivered"
        assert deliveries(sink.messages) == {(done.message_id, "stall@example.test"): 1}
    finally:
        runtime.close()
