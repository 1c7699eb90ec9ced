"""Workers as real processes against a private Redis and DevSink: kept connections, pools, idempotency,
priorities, scheduled sends and a graceful SIGTERM (issue 3, "Tests")."""

from __future__ import annotations

import math
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from email import message_from_bytes
from email.utils import parsedate_to_datetime
from typing import Any

import pytest
import redis
from helpers import wait_until
from queue_support import PYTHON, ROOT, GatedSink, WorkerRun, base_env, smtp_url
from rq import Queue
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer
from servers import RecordingSmtpServer

from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

StartWorkers = Callable[..., WorkerRun]
SmtpServer = Callable[..., RecordingSmtpServer]
QUEUES = ("mail-high", "mail-default", "mail-bulk")


def mail(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "from": "app@example.com",
        "to": f"rcpt{n}@example.org",
        "subject": f"mail {n}",
        "text": f"body {n}",
        **extra,
    }


def message_ids(sink: RecordingSmtpServer) -> list[str]:
    return [str(message_from_bytes(m.data)["Message-ID"]) for m in sink.messages]


def subjects(sink: RecordingSmtpServer) -> list[str]:
    return [str(message_from_bytes(m.data)["Subject"]) for m in sink.messages]


def pending_jobs(client: redis.Redis) -> dict[str, int]:
    """Jobs still queued or scheduled in any mail queue: nothing here means nothing more can be sent."""
    out: dict[str, int] = {}
    for name in QUEUES:
        queue = Queue(name, connection=client, serializer=JSONSerializer)
        out[name] = queue.count
        out[f"{name}:scheduled"] = ScheduledJobRegistry(queue=queue).count
    return out


def ready_workers(client: redis.Redis) -> int:
    """rq workers in their work loop (idle or busy): past start-up, their signal handlers installed."""
    states = [client.hget(key, "state") for key in client.smembers("rq:workers")]
    return sum(state in (b"idle", b"busy") for state in states)


def whole_second_ahead(seconds: float) -> float:
    """A Unix time at least ``seconds`` ahead, on a whole second: rq scores scheduled jobs in whole seconds
    and truncates (see test_scheduled_job_is_not_due_before_a_fractional_send_at)."""
    return float(math.ceil(time.time() + seconds))


def shutdown_requested(client: redis.Redis) -> bool:
    workers = client.smembers("rq:workers")
    return any(client.hget(key, "shutdown_requested_date") for key in workers)


def enqueue_all(client: redis.Redis, mails: list[dict[str, Any]]) -> list[str]:
    results = Producer(client).enqueue_many(mails)
    ids = []
    for result in results:
        assert not isinstance(result, Exception), result
        ids.append(result.message_id)
    return ids


def test_one_process_delivers_200_over_one_connection(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    expected = enqueue_all(redis_client, [mail(n) for n in range(200)])

    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=40) == 0, worker.text()

    assert len(sink.messages) == 200
    assert sink.connections == 1
    assert Counter(message_ids(sink)) == Counter(expected)  # each exactly once
    assert SendStore(redis_client).count_states()["delivered"] == 200
    # The kept connection was closed with QUIT at the end of the burst, not dropped.
    assert sink.command_lines()[-1] == "QUIT"
    assert sink.command_lines().count("QUIT") == 1


def test_four_processes_use_at_most_four_connections(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    expected = enqueue_all(redis_client, [mail(n) for n in range(200)])

    pool = start_workers(smtp_url(sink.port), "--concurrency", "4", "--burst")
    assert pool.wait(timeout=40) == 0, pool.text()

    assert Counter(message_ids(sink)) == Counter(expected)  # all 200, each exactly once
    assert 1 <= sink.connections <= 4
    assert sink.max_active_connections <= 4
    # Each process kept ONE connection: as many connections as processes that delivered something.
    delivering = {e["worker"] for e in pool.events() if e.get("event") == "mail_delivered"}
    assert len(delivering) == sink.connections
    pool_started = [e for e in pool.events() if e.get("event") == "pool_started"]
    assert pool_started and len(pool_started[0]["pids"]) == 4
    assert SendStore(redis_client).count_states()["delivered"] == 200


def test_same_key_now_then_scheduled_is_one_record_and_one_delivery(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    producer = Producer(redis_client)
    first = producer.enqueue(mail(1, key="order-1"))
    second = producer.enqueue(mail(1, key="order-1", send_at=time.time() + 3600))
    assert not first.duplicate and second.duplicate and second.id == first.id
    assert len(list(redis_client.scan_iter("dispatch:send:*"))) == 1
    assert pending_jobs(redis_client) == {**dict.fromkeys(pending_jobs(redis_client), 0), "mail-default": 1}

    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=30) == 0, worker.text()

    assert message_ids(sink) == [first.message_id]
    assert set(pending_jobs(redis_client).values()) == {0}
    rec = SendStore(redis_client).load(first.id)
    assert rec is not None and rec.state == "delivered" and rec.attempts == 1


def test_same_key_scheduled_then_now_is_one_record_and_one_delivery(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    producer = Producer(redis_client)
    send_at = whole_second_ahead(1.5)
    first = producer.enqueue(mail(2, key="order-2", send_at=send_at))
    second = producer.enqueue(mail(2, key="order-2"))
    # In one batch too: the same key twice inside enqueue_many is one send.
    third, fourth = producer.enqueue_many([mail(2, key="order-2"), mail(2, key="order-2", priority="high")])
    for dup in (second, third, fourth):
        assert not isinstance(dup, Exception) and dup.duplicate and dup.id == first.id
    assert len(list(redis_client.scan_iter("dispatch:send:*"))) == 1
    jobs = pending_jobs(redis_client)
    assert jobs["mail-default:scheduled"] == 1 and sum(jobs.values()) == 1  # nothing queued for now
    rec = SendStore(redis_client).load(first.id)
    assert rec is not None and rec.state == "scheduled"

    worker = start_workers(smtp_url(sink.port))  # not burst: its scheduler releases the job when due
    sink.wait_for_messages(1, timeout=15)
    wait_until(lambda: set(pending_jobs(redis_client).values()) == {0}, timeout=10)
    worker.terminate()
    assert worker.wait(timeout=15) == 0, worker.text()

    # Worker stopped and nothing left queued or scheduled anywhere: no second delivery can still come.
    assert message_ids(sink) == [first.message_id]
    assert sink.messages[0].received_at >= send_at
    rec = SendStore(redis_client).load(first.id)
    assert rec is not None and rec.state == "delivered" and rec.attempts == 1


def test_high_priority_enqueued_later_is_delivered_first(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    producer = Producer(redis_client)
    for n in range(5):
        producer.enqueue(mail(n, subject=f"bulk {n}", priority="bulk"))
    for n in range(20):
        producer.enqueue(mail(n, subject=f"default {n}"))
    for n in range(5):
        producer.enqueue(mail(n, subject=f"high {n}", priority="high"))

    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=30) == 0, worker.text()

    order = subjects(sink)
    assert order == (
        [f"high {n}" for n in range(5)]
        + [f"default {n}" for n in range(20)]
        + [f"bulk {n}" for n in range(5)]
    )
    times = [m.received_at for m in sink.messages]
    assert times == sorted(times)


def test_send_at_two_seconds_ahead_is_delivered_after_not_before(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    worker = start_workers(smtp_url(sink.port))
    worker.wait_for_event(lambda e: e.get("event") == "worker_started", timeout=15, what="worker_started")

    send_at = whole_second_ahead(2.0)
    sent = Producer(redis_client).enqueue(mail(7, send_at=send_at))
    rec = SendStore(redis_client).load(sent.id)
    assert rec is not None and rec.state == "scheduled"

    messages = sink.wait_for_messages(1, timeout=send_at - time.time() + 5)
    assert messages[0].received_at >= send_at, "delivered before its send_at"
    assert message_ids(sink) == [sent.message_id]
    # The Date header is the due time, not the enqueue time.
    date = parsedate_to_datetime(str(message_from_bytes(messages[0].data)["Date"]))
    assert date.timestamp() >= send_at
    wait_until(lambda: (r := SendStore(redis_client).load(sent.id)) is not None and r.state == "delivered")


@pytest.mark.parametrize("pool_args", [[], ["--concurrency", "2"]], ids=["one-process", "pool-of-2"])
def test_sigterm_during_a_slow_send_finishes_it_quits_and_exits_0(
    redis_client: redis.Redis, gated_sink: GatedSink, start_workers: StartWorkers, pool_args: list[str]
) -> None:
    worker = start_workers(smtp_url(gated_sink.port), *pool_args)
    sent = Producer(redis_client).enqueue(mail(9))
    assert gated_sink.data_arrived.wait(timeout=15), worker.text()  # the server now holds its 250
    # Every process is past start-up (rq's signal handlers installed; see the start-up race test below).
    processes = int(pool_args[1]) if pool_args else 1
    wait_until(lambda: ready_workers(redis_client) == processes, timeout=15, message="workers not ready")

    worker.terminate()
    # rq notes a warm shutdown requested while busy on the worker's Redis hash: the signal was handled.
    wait_until(
        lambda: worker.proc.poll() is not None or shutdown_requested(redis_client),
        timeout=10,
        message="SIGTERM not handled",
    )
    assert worker.proc.poll() is None, f"the worker left before the send finished:\n{worker.text()}"
    gated_sink.release.set()

    assert worker.wait(timeout=20) == 0, worker.text()
    assert message_ids(gated_sink) == [sent.message_id]
    lines = gated_sink.command_lines()
    assert lines[-1] == "QUIT", lines
    assert any(line.startswith("DATA") or line.startswith("BDAT") for line in lines)
    quit_at = lines.index("QUIT")
    assert all(not line.startswith(("MAIL", "RCPT", "DATA", "BDAT")) for line in lines[quit_at:])
    assert gated_sink.connections == 1
    wait_until(lambda: gated_sink.active_connections == 0, timeout=5, message="connection left open")
    rec = SendStore(redis_client).load(sent.id)
    assert rec is not None and rec.state == "delivered" and rec.attempts == 1


def test_scheduled_job_is_not_due_before_a_fractional_send_at(redis_client: redis.Redis) -> None:
    send_at = math.floor(time.time()) + 5.7
    sent = Producer(redis_client).enqueue(mail(8, send_at=send_at))
    registry = ScheduledJobRegistry(queue=Queue("mail-default", connection=redis_client))
    score = redis_client.zscore(registry.key, sent.id)
    assert score is not None
    # rq releases a job once int(now) >= its score: the score must not be below send_at.
    assert score >= send_at, f"due at {score}, {send_at - score:.1f} s before send_at {send_at}"


def cold_stop_during_slow_send(
    redis_client: redis.Redis, gated_sink: GatedSink, start_workers: StartWorkers
) -> tuple[WorkerRun, str, int]:
    """Hold a worker's send at the final dot, SIGTERM it twice (> 1 s apart); (worker, send id, exit code)."""
    worker = start_workers(smtp_url(gated_sink.port))
    sent = Producer(redis_client).enqueue(mail(10))
    assert gated_sink.data_arrived.wait(timeout=15), worker.text()
    worker.terminate()
    wait_until(lambda: shutdown_requested(redis_client), timeout=10, message="SIGTERM not handled")
    # rq ignores a second signal that comes within 1 s of the first (pool de-duplication): wait that out.
    first_handled = time.monotonic()
    wait_until(lambda: time.monotonic() - first_handled > 1.2, timeout=5)
    worker.terminate()
    code = worker.wait(timeout=10)  # well before the sink's 15 s hold ends
    return worker, sent.id, code


def test_second_sigterm_aborts_the_slow_send_and_records_it_unknown(
    redis_client: redis.Redis, gated_sink: GatedSink, start_workers: StartWorkers
) -> None:
    _, send_id, code = cold_stop_during_slow_send(redis_client, gated_sink, start_workers)

    assert code >= 0, "ended by a signal, not by its own cold shutdown"
    assert not gated_sink.release.is_set() and gated_sink.messages == []
    wait_until(lambda: gated_sink.active_connections == 0, timeout=5, message="connection left open")
    # The data went out without a final reply: the outcome is unknown, never silently resent or lost.
    rec = SendStore(redis_client).load(send_id)
    assert rec is not None and rec.state == "unknown", rec
    assert rec.status()["recipients"]["rcpt10@example.org"]["status"] == "unknown"
    assert redis_client.zcard("dispatch:inflight") == 0
    assert set(pending_jobs(redis_client).values()) == {0}
    # Aborted: no further command into a connection in an unknown state.
    assert "QUIT" not in gated_sink.command_lines()


def test_interrupted_attempt_records_how_long_it_ran(
    redis_client: redis.Redis, gated_sink: GatedSink, start_workers: StartWorkers
) -> None:
    worker, send_id, _ = cold_stop_during_slow_send(redis_client, gated_sink, start_workers)
    rec = SendStore(redis_client).load(send_id)
    assert rec is not None and rec.state == "unknown"
    # The attempt was held at the final dot for more than 1.2 s before the second signal.
    assert rec.status()["history"][-1]["ms"] >= 1000, rec.status()["history"]
    summary = [e for e in worker.events() if e.get("event") == "mail_unknown"]
    assert summary and summary[0]["total_ms"] >= 1000, summary


def test_sigterm_right_after_the_pool_started_exits_0(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    pool = start_workers(smtp_url(sink.port), "--concurrency", "2")
    pool.wait_for_event(lambda e: e.get("event") == "pool_started", timeout=15, what="pool_started")
    pool.terminate()  # the children are forked a moment ago: some may not have their rq handlers yet
    code = pool.wait(timeout=20)
    stopped = [e for e in pool.events() if e.get("event") == "pool_stopped"]
    assert code == 0, stopped


def test_sigterm_the_moment_pool_started_is_written_stops_the_pool(redis_url: str) -> None:
    """The supervisor's stop handler logs (``pool_stopping``); a SIGTERM that lands while the supervisor
    itself is still writing ``pool_started`` ran that handler inside the write — and the log output's lock
    was not reentrant, so the pool hung there for ever (13 of 20 tries, read from the pipe at once)."""
    env = base_env(redis_url, SMTP_URL="smtp://127.0.0.1:9?tls=off")
    for _ in range(5):
        pool = subprocess.Popen([PYTHON, "worker.py", "--concurrency", "2"], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            assert pool.stdout is not None
            for line in pool.stdout:
                if '"pool_started"' in line:
                    break
            pool.send_signal(signal.SIGTERM)
            assert pool.wait(timeout=20) == 0
        finally:
            if pool.poll() is None:  # its children stop by themselves once it is gone (lineage)
                pool.kill()
                pool.wait()
