"""An attempt's outcome is one Lua script (``SendStore.record_outcome``), or that script inside the MULTI that
schedules the next attempt through rq (``stage_outcome``): both write the ledger, record, state indexes
and lease as one, also when Redis has forgotten the script (a restart, ``SCRIPT FLUSH``)."""

from __future__ import annotations

import math
import time

import redis
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.queue.keys import INFLIGHT
from dispatcher.queue.producer import Producer, attempt_job_id, schedule_attempt
from dispatcher.queue.records import SendRecord
from dispatcher.queue.recovery import reap_abandoned
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore

MAIL = {"from": "app@example.com", "to": ["a@example.org", "b@example.org"], "subject": "s", "text": "hi",
        "message_id": "<outcome-script@example.com>"}  # given: its ledger is a set (test_store_layout)


def begun(connection: redis.Redis) -> tuple[SendStore, SendRecord]:
    """A send enqueued and begun (``sending``, leased), as an attempt leaves it before its outcome."""
    store = SendStore(connection)
    send_id = Producer(connection).enqueue(MAIL).id
    rec = store.load_whole(send_id)
    assert rec is not None
    rec.move(SendState.SENDING)
    rec.attempts += 1
    assert store.begin_attempt(rec, now=time.time(), lease_seconds=60) is not None
    return store, rec


def test_a_delivered_outcome_is_written_whole_even_after_a_script_flush(redis_client: redis.Redis) -> None:
    store, rec = begun(redis_client)
    redis_client.script_flush()
    rec.move(SendState.DELIVERED)
    store.record_outcome(rec, ["a@example.org", "b@example.org"], now=time.time())
    stored = store.load(rec.send_id)
    assert stored is not None and stored.state is SendState.DELIVERED and stored.attempts == 1
    assert store.ledger(rec.message_id) == {"a@example.org", "b@example.org"}
    assert rec.send_id not in store.leased()
    assert store.ids_in_state(SendState.DELIVERED) == [rec.send_id]
    assert store.ids_in_state(SendState.SENDING) == []
    assert store.count_states("default")[SendState.DELIVERED] == 1
    assert sum(n for _, n in store.delivered_per_minute(2)) == 1


def test_a_deferred_outcome_and_its_rq_schedule_go_in_one_transaction(redis_client: redis.Redis) -> None:
    store, rec = begun(redis_client)
    redis_client.script_flush()
    rec.move(SendState.DEFERRED)
    job_id = attempt_job_id(rec.send_id, rec.generation, rec.attempts + 1)
    pipe = store.transaction()
    schedule_attempt(pipe, redis_client, rec, job_id, time.time() + 300)
    store.stage_outcome(pipe, rec, ["a@example.org"], now=time.time())
    store.execute(pipe)
    stored = store.load(rec.send_id)
    assert stored is not None and stored.state is SendState.DEFERRED and stored.rq_job == job_id
    assert stored.next_attempt_at is not None and stored.next_attempt_at > time.time() + 200
    assert store.ledger(rec.message_id) == {"a@example.org"}
    assert rec.send_id not in store.leased()
    assert store.ids_in_state(SendState.DEFERRED) == [rec.send_id]
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    assert queue.scheduled_job_registry.get_job_ids() == [job_id]  # rq's own reader finds it
    assert Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer).args == [rec.send_id]


def test_a_deferred_outcomes_next_attempt_is_scheduled_by_the_transaction_not_before_it(
    redis_client: redis.Redis,
) -> None:
    """rq 2.12's ``ScheduledJobRegistry.schedule`` ignores the pipeline it is given and adds the job with
    its own connection at once: the schedule would land before the outcome's MULTI ran — or without it,
    when Redis goes away in between (chaos saw a raw ``BusyLoadingError`` escape an outcome that way)."""
    store, rec = begun(redis_client)
    rec.move(SendState.DEFERRED)
    when = time.time() + 30
    job_id = attempt_job_id(rec.send_id, rec.generation, rec.attempts + 1)
    pipe = store.transaction()
    store.stage_outcome(pipe, rec, [], now=time.time())
    schedule_attempt(pipe, redis_client, rec, job_id, when)
    assert redis_client.zscore("rq:scheduled:mail-default", job_id) is None  # nothing before EXEC
    assert not redis_client.exists(f"rq:job:{job_id}")
    store.execute(pipe)
    assert redis_client.zscore("rq:scheduled:mail-default", job_id) == math.ceil(when)
    job = Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
    assert job.get_status() == "scheduled"
    assert redis_client.sismember("rq:queues", "rq:queue:mail-default")


def expire_lease_and_reap(connection: redis.Redis, send_id: str) -> None:
    """Its worker stalled past the lease (a paused VM, a stopped process): recovery takes the send."""
    connection.zadd(INFLIGHT, {send_id: time.time() - 1})
    reap_abandoned(connection)


def test_a_stalled_attempts_outcome_after_another_attempt_took_the_send_writes_only_the_ledger(
    redis_client: redis.Redis,
) -> None:
    """The review of session 6: a worker stalled past its lease before its data went out; recovery
    requeued the send, a second attempt delivered it, and then the first one woke and wrote its deferral
    over the delivery (the record said deferred, both indexes held it)."""
    store, first = begun(redis_client)
    expire_lease_and_reap(redis_client, first.send_id)
    second = store.load_whole(first.send_id)
    assert second is not None and second.state is SendState.QUEUED
    second.move(SendState.SENDING)
    second.attempts += 1
    assert store.begin_attempt(second, now=time.time(), lease_seconds=60) is not None
    second.move(SendState.DELIVERED)
    assert store.record_outcome(second, ["a@example.org", "b@example.org"], now=time.time(), live=True)

    first.move(SendState.DEFERRED)
    assert not store.record_outcome(first, ["a@example.org"], now=time.time(), live=True)
    stored = store.load(first.send_id)
    assert stored is not None and stored.state is SendState.DELIVERED and stored.attempts == 2
    assert store.ids_in_state(SendState.DELIVERED) == [first.send_id]
    assert store.ids_in_state(SendState.DEFERRED) == []
    assert store.ledger(first.message_id) == {"a@example.org", "b@example.org"}


def test_a_stalled_attempts_outcome_after_recovery_settled_it_unknown_is_written(
    redis_client: redis.Redis,
) -> None:
    """Its data had gone out, so recovery settled the send unknown; the attempt's real outcome, known
    late, replaces "may have been delivered" and the send leaves the unknown index."""
    store, rec = begun(redis_client)
    store.mark_data_out(rec.send_id, rec.attempts)
    expire_lease_and_reap(redis_client, rec.send_id)
    assert store.ids_in_state(SendState.UNKNOWN) == [rec.send_id]
    rec.move(SendState.DELIVERED)
    assert store.record_outcome(rec, ["a@example.org", "b@example.org"], now=time.time(), live=True)
    stored = store.load(rec.send_id)
    assert stored is not None and stored.state is SendState.DELIVERED
    assert store.ids_in_state(SendState.UNKNOWN) == []
    assert store.ids_in_state(SendState.DELIVERED) == [rec.send_id]


def test_an_outcome_written_twice_is_written_once(redis_client: redis.Redis) -> None:
    """A retried write (Redis dropped the reply to the first, which ran) finds its own outcome there."""
    store, rec = begun(redis_client)
    rec.move(SendState.DELIVERED)
    assert store.record_outcome(rec, ["a@example.org"], now=time.time(), live=True)
    rec.stored_state = SendState.SENDING
    assert store.record_outcome(rec, ["a@example.org"], now=time.time(), live=True)
    assert store.ids_in_state(SendState.DELIVERED) == [rec.send_id]
    assert store.load(rec.send_id).state is SendState.DELIVERED
