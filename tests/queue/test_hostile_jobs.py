"""Jobs we did not write (issue 14 items 2-3, issue 13 invariant 4): any Redis writer can push a job, so a
worker runs only our two job functions, with arguments of the right shape, and fails everything else with
a reason — before rq imports anything by name — and takes the next job. Real worker processes, a real
Redis, a recording SMTP server; the bad jobs are pushed with rq's API and with a raw redis-py client."""

from __future__ import annotations

import json
import pickle
import zlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import redis
from helpers import alive, wait_until
from queue_support import WorkerRun, smtp_url
from rq import Callback, Queue
from rq.job import Job
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer
from servers import RecordingSmtpServer

from dispatcher.queue.producer import BATCH_FUNCTION, JOB_FUNCTION, Producer

StartWorkers = Callable[..., WorkerRun]
SmtpServer = Callable[..., RecordingSmtpServer]
GOOD = {"from": "app@example.com", "to": "ann@example.org", "subject": "good", "text": "hello"}


def push_raw_job(
    client: redis.Redis, job_id: str, data: bytes, queue: str = "mail-default", **extra: str
) -> None:
    """A job written the way any Redis client can write one: a hash and its id on the queue's list."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    fields: dict[str, str | bytes] = {
        "data": data, "origin": queue, "status": "queued", "created_at": stamp, "enqueued_at": stamp,
        "description": "raw", **extra,
    }  # fmt: skip
    client.hset(f"rq:job:{job_id}", mapping=fields)
    client.sadd("rq:queues", f"rq:queue:{queue}")
    client.rpush(f"rq:queue:{queue}", job_id)


def json_job(func: object, args: object, kwargs: object = None, instance: object = None) -> bytes:
    return zlib.compress(json.dumps([func, instance, args, kwargs or {}]).encode())


def failure_text(client: redis.Redis, job_id: str) -> str:
    """What rq kept of a failed job's failure (the latest result's exc_string, else the job's exc_info)."""
    job = Job(job_id, connection=client, serializer=JSONSerializer)
    result = job.latest_result()
    if result is not None and result.exc_string:
        return str(result.exc_string)
    info = client.hget(job.key, "exc_info")
    return zlib.decompress(info).decode() if info else ""


def failed_ids(client: redis.Redis, queue: str = "mail-default") -> set[str]:
    registry = FailedJobRegistry(queue=Queue(queue, connection=client, serializer=JSONSerializer))
    return set(registry.get_job_ids())


def refused(run: WorkerRun) -> dict[str, dict[str, object]]:
    return {str(e["job_id"]): e for e in run.events() if e.get("event") == "job_refused"}


def test_a_job_naming_any_other_function_is_failed_never_run_and_the_worker_goes_on(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers, tmp_path: Path
) -> None:
    sink = smtp_server()
    marker = tmp_path / "x"
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    evil = queue.enqueue("os.system", f"touch {marker}")  # exactly what issue 14 did
    # Our own function is refused too when it carries what rq would import by name (a callback).
    hooked = queue.enqueue(JOB_FUNCTION, "mail-" + "0" * 32, on_success=Callback("os.getpid"))
    worker = start_workers(smtp_url(sink.port))  # one process, not burst: it must keep running
    Producer(redis_client).enqueue(GOOD)  # behind the bad jobs in the same queue

    sink.wait_for_messages(1, timeout=30)
    assert not marker.exists(), "os.system ran on the worker"
    worker.wait_for_event(lambda e: e.get("event") == "mail_delivered", 10, "the good mail")
    assert worker.proc.poll() is None, worker.text()
    assert {evil.id, hooked.id} <= failed_ids(redis_client)
    for job in (evil, hooked):
        job.refresh()
        assert job.get_status() == "failed"
    assert "os.system" in failure_text(redis_client, evil.id)
    assert "not a dispatcher job function" in failure_text(redis_client, evil.id)
    assert "callback" in failure_text(redis_client, hooked.id)
    events = refused(worker)
    assert events[evil.id]["func"] == "os.system" and "not a dispatcher job function" in str(
        events[evil.id]["reason"]
    )
    assert hooked.id in events
    assert not [line for line in worker.raw_lines() if "Traceback" in line], worker.text()


def test_undecodable_and_malformed_jobs_are_failed_and_a_pool_of_two_keeps_delivering(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers, tmp_path: Path
) -> None:
    sink = smtp_server()
    marker = tmp_path / "pickled"
    bad = {
        "pickled": zlib.compress(pickle.dumps(("os.system", None, (f"touch {marker}",), {}))),
        "garbage": b"{this is not json",
        "not-a-tuple": json.dumps({"func": JOB_FUNCTION}).encode(),
        "no-args": json_job(JOB_FUNCTION, []),
        "int-arg": json_job(JOB_FUNCTION, [42]),
        "bad-id": json_job(JOB_FUNCTION, ["../../etc/passwd"]),
        "kwargs": json_job(JOB_FUNCTION, ["mail-" + "1" * 32], {"send_id": "x"}),
        "instance": json_job("system", [f"touch {marker}"], instance={"x": 1}),
        "batch-str": json_job(BATCH_FUNCTION, ["mail-" + "2" * 32]),
        "batch-huge": json_job(BATCH_FUNCTION, [["mail-" + f"{n:032x}" for n in range(500)]]),
    }
    for name, data in bad.items():
        push_raw_job(redis_client, f"bad-{name}", data)
    push_raw_job(redis_client, "bad-status", json_job(JOB_FUNCTION, ["mail-" + "3" * 32]), status="bogus")
    Producer(redis_client).enqueue(GOOD)

    pool = start_workers(smtp_url(sink.port), "--concurrency", "2")
    sink.wait_for_messages(1, timeout=30)
    pool.wait_for_event(lambda e: e.get("event") == "mail_delivered", 10, "the good mail")

    started = [e for e in pool.events() if e.get("event") == "pool_started"]
    assert started, pool.text()
    pids = started[0]["pids"]
    assert all(alive(pid) for pid in pids), pool.text()
    deaths = ("worker_process_died", "worker_process_crashed", "worker_loop_ended")
    assert not [e for e in pool.events() if e.get("event") in deaths], pool.text()
    assert not marker.exists()
    expected = {f"bad-{name}" for name in bad} | {"bad-status"}
    assert expected <= failed_ids(redis_client), pool.text()
    events = refused(pool)
    assert expected <= set(events), sorted(events)
    assert "undecodable" in str(events["bad-pickled"]["reason"])
    assert "undecodable" in str(events["bad-garbage"]["reason"])
    assert "send id" in str(events["bad-int-arg"]["reason"])
    assert "send id" in str(events["bad-bad-id"]["reason"])
    assert "undecodable" in failure_text(redis_client, "bad-pickled")
    assert not [line for line in pool.raw_lines() if "Traceback" in line], pool.text()
    assert "status" in failure_text(redis_client, "bad-status") or "bogus" in failure_text(
        redis_client, "bad-status"
    )


def test_an_abandoned_job_with_a_callback_is_failed_by_the_worker_without_importing_it(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    """rq's registry maintenance fails an abandoned job (expired in the started registry) by calling its
    failure callback, imported by name: the second way a Redis writer could make a worker run code."""
    sink = smtp_server()
    job_id = "abandoned-1"
    push_raw_job(redis_client, job_id, json_job(JOB_FUNCTION, ["mail-" + "4" * 32]),
                 status="started", failure_callback_name="builtins.print")  # fmt: skip
    redis_client.lrem("rq:queue:mail-default", 0, job_id)  # in no queue: only in the started registry
    redis_client.zadd("rq:wip:mail-default", {f"{job_id}:exec-1": 1})  # expired long ago
    worker = start_workers(smtp_url(sink.port))

    wait_until(lambda: job_id in failed_ids(redis_client), timeout=30, message=worker.text())
    assert "callback" in failure_text(redis_client, job_id)
    assert not [line for line in worker.raw_lines() if "AbandonedJobError" in line], worker.text()
    assert job_id in refused(worker)
    Producer(redis_client).enqueue(GOOD)
    sink.wait_for_messages(1, timeout=30)
    assert worker.proc.poll() is None


def test_a_worker_with_k_connections_never_adopts_a_job_not_ours(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers, tmp_path: Path
) -> None:
    """A worker with ``--connections 3`` adopts the queued jobs behind the one it starts
    (``worker.adoption``): a job not ours among them goes back to the head of the queue, is never run, and
    is failed with its reason by rq's next dequeue; the good jobs around it are all delivered."""
    sink = smtp_server()
    marker = tmp_path / "x"
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    producer = Producer(redis_client)
    before = producer.enqueue_many([{**GOOD, "subject": f"before {i}"} for i in range(3)])
    evil = queue.enqueue("os.system", f"touch {marker}")
    after = producer.enqueue_many([{**GOOD, "subject": f"after {i}"} for i in range(3)])
    worker = start_workers(smtp_url(sink.port), "--connections", "3")
    sink.wait_for_messages(6, timeout=30)
    worker.wait_for_event(lambda e: e.get("event") == "job_refused", 10, "the refusal of the job not ours")
    assert not marker.exists(), "os.system ran on the worker"
    assert evil.id in failed_ids(redis_client)
    assert "not a dispatcher job function" in failure_text(redis_client, evil.id)
    assert refused(worker)[evil.id]["func"] == "os.system"
    assert len(sink.messages) == len(before) + len(after) == 6
    assert worker.proc.poll() is None, worker.text()
    assert not [line for line in worker.raw_lines() if "Traceback" in line], worker.text()
