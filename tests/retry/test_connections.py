"""``worker.py --connections K``: one process spreads a batch over K connections to the route (issue 15).

Every test runs real worker processes against a real Redis and real SMTP servers: each send is delivered
once, and a break, a ``kill -9`` or a cold shutdown mid-batch with K > 1 leaves no send lost or sent twice.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis
from helpers import wait_until
from retrykit import PYTHON, ROOT, StartWorker, env_for, load, mail, message_id_of, process_env, smtp_url
from rq import Queue
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.timeouts import JobTimeoutException, UnixSignalDeathPenalty
from servers import Fault, RecordingSmtpServer, ScriptedSmtpServer

from dispatcher.delivery.jobs import Batch
from dispatcher.queue.producer import Producer
from dispatcher.queue.records import text
from dispatcher.queue.recovery import reap_abandoned, requeue_unstarted
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.adoption import adopt
from dispatcher.worker.process import MailWorker
from dispatcher.worker.runtime import Runtime

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]


def enqueue(connection: redis.Redis, n: int) -> dict[str, str]:
    """``n`` one-recipient mails enqueued together (batches of 20): Message-ID → send id."""
    done = Producer(connection).enqueue_many([mail([f"user{i}@example.org"], f"conns {i}") for i in range(n)])
    return {r.message_id: r.id for r in done if not isinstance(r, Exception)}


def burst(env: dict[str, str], *args: str) -> None:
    done = subprocess.run([PYTHON, "worker.py", "--burst", *args], cwd=ROOT, env=process_env(env),
                          capture_output=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr.decode()[-3000:]


def states(connection: redis.Redis, sends: dict[str, str]) -> dict[str, str]:
    """Message-ID → the send's state."""
    return {mid: str(load(connection, send_id).state) for mid, send_id in sends.items()}


def wait_due(connection: redis.Redis, sends: dict[str, str]) -> None:
    """Until every deferred send's next job is due for rq's scheduler (it releases a job once the whole
    second of its score has passed)."""

    def due() -> bool:
        nexts = [load(connection, s).next_attempt_at for s in sends.values()]
        return all(at is None or time.time() >= math.ceil(at) for at in nexts)

    wait_until(due, 10, message="the deferred sends never came due")


def copies(server: ScriptedSmtpServer, *, accepted: bool) -> Counter[str]:
    """Message-ID → how many times its data reached the server (only those answered 250 if ``accepted``)."""
    counts: Counter[str] = Counter()
    for message in server.messages:
        if accepted and not (message.final_reply or b"").startswith(b"250"):
            continue
        counts[str(message_id_of(message.data))] += 1
    return counts


def test_a_batch_over_three_connections_delivers_every_send_once(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis
) -> None:
    sink = smtp_server()
    sends = enqueue(redis_client, 45)
    burst(env_for(redis_url, smtp_url(sink.port)), "--connections", "3")
    assert Counter(str(message_id_of(m.data)) for m in sink.messages) == Counter(dict.fromkeys(sends, 1))
    assert sink.connections == 3  # kept across the three jobs
    records = [load(redis_client, send_id) for send_id in sends.values()]
    assert {(rec.state, rec.attempts) for rec in records} == {("delivered", 1)}
    assert len({rec.status()["history"][-1]["conn_id"] for rec in records}) == 3


def test_every_process_of_a_pool_uses_k_connections(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis
) -> None:
    sink = smtp_server()
    sends = enqueue(redis_client, 60)
    burst(env_for(redis_url, smtp_url(sink.port)), "--concurrency", "2", "--connections", "3")
    assert Counter(str(message_id_of(m.data)) for m in sink.messages) == Counter(dict.fromkeys(sends, 1))
    assert sink.connections in (3, 6)  # 3 per process that took a job (one may have taken all three)
    assert set(states(redis_client, sends).values()) == {"delivered"}


def test_a_route_capped_by_max_connections_caps_k(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis
) -> None:
    """Each of the process's connections holds a slot of its own: never more than the route's cap."""
    sink = smtp_server()
    sends = enqueue(redis_client, 30)
    burst(env_for(redis_url, smtp_url(sink.port, max_connections=2)), "--connections", "4")
    assert Counter(str(message_id_of(m.data)) for m in sink.messages) == Counter(dict.fromkeys(sends, 1))
    assert sink.max_active_connections == 2
    assert set(states(redis_client, sends).values()) == {"delivered"}


@pytest.mark.parametrize("connections", ["1", "3"])
def test_a_drop_on_one_connection_mid_batch_costs_only_that_connections_sends(
    connections: str, scripted_server: Scripted, redis_url: str, redis_client: redis.Redis
) -> None:
    """The first connection drops after its 2nd message's final dot: that message is *unknown*, one whose
    envelope followed it goes again later; every other send is delivered once — as on one connection."""
    server = scripted_server(faults={"data_end": Fault("drop", occurrence=2)}, faults_on_connection=1)
    sends = enqueue(redis_client, 12)
    env = env_for(redis_url, smtp_url(server.port))
    burst(env, "--connections", connections)
    first = states(redis_client, sends)
    assert Counter(first.values())["unknown"] == 1, first
    assert set(first.values()) <= {"delivered", "unknown", "deferred"}, first
    wait_due(redis_client, sends)
    burst(env, "--connections", connections)
    final = states(redis_client, sends)
    (lost,) = [mid for mid, state in final.items() if state == "unknown"]
    assert set(final.values()) == {"delivered", "unknown"}, final
    assert copies(server, accepted=True) == Counter({mid: 1 for mid in sends if mid != lost})
    assert copies(server, accepted=False)[lost] == 1  # its data went out once, never again


@pytest.mark.parametrize("jobs", [1, 3], ids=["one job of 9", "three jobs of 3, two adopted"])
def test_kill_9_mid_batch_over_three_connections_loses_nothing_and_sends_nothing_twice(
    jobs: int, scripted_server: Scripted, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    """Killed while one message hangs at its final dot. With three jobs the first adopts the other two
    (``worker.adoption``): finished in rq, only the leases own their sends — recovery settles them as it
    settles the job's own."""
    server = scripted_server(faults={"data_end": Fault("hang")}, faults_on_connection=1)
    sends = {mid: s for _ in range(jobs) for mid, s in enqueue(redis_client, 9 // jobs).items()}
    env = env_for(redis_url, smtp_url(server.port, timeout=120),
                  DISPATCH_LEASE_SECONDS="3", DISPATCH_MAINTENANCE_INTERVAL="1")  # fmt: skip
    victim = start_worker(env, "--connections", "3")

    def hung_and_others_done() -> bool:
        delivered = Counter(states(redis_client, sends).values())["delivered"]
        return len(server.messages) - delivered == 1 and delivered >= 7

    wait_until(hung_and_others_done, 30, message="the other connections did not deliver around the hang")
    assert ("jobs_adopted" in victim.log_text()) == (jobs > 1)
    # rq's started registry keeps the running job for its timeout, which counts all 9 sends it delivers
    (expiry,) = [score for _, score in redis_client.zrange("rq:wip:mail-default", 0, -1, withscores=True)]
    assert expiry - time.time() > load_settings(env, need_routes=True).job_timeout() * 8
    victim.kill9()
    start_worker(env, "--connections", "3")  # the survivor: recovery settles the dead worker's sends
    wait_until(lambda: set(states(redis_client, sends).values()) <= {"delivered", "unknown"}, 60,
               message="the dead batch's sends were not settled")  # fmt: skip
    final = states(redis_client, sends)
    (hung,) = [mid for mid, state in final.items() if state == "unknown"]
    assert load(redis_client, sends[hung]).data_out is None
    assert copies(server, accepted=True) == Counter({mid: 1 for mid in sends if mid != hung})
    assert copies(server, accepted=False)[hung] == 1


def test_a_cold_shutdown_mid_batch_records_each_connections_sends_as_one_connection_would(
    scripted_server: Scripted, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    """The interruption (a second SIGTERM; a job timeout comes the same way, in the job's thread) stops
    every connection: the message held at its final dot is *unknown*, a message whose data never went is
    deferred, the rest delivered — and none of them is sent again afterwards."""
    server = scripted_server(faults={"data_end": Fault("hang")}, faults_on_connection=1)
    sends = enqueue(redis_client, 9)
    env = env_for(redis_url, smtp_url(server.port, timeout=120))
    victim = start_worker(env, "--connections", "3")
    wait_until(lambda: Counter(states(redis_client, sends).values())["delivered"] >= 7
               and len(server.messages) == Counter(states(redis_client, sends).values())["delivered"] + 1,
               30, message="the other connections did not deliver around the hang")  # fmt: skip
    victim.process.send_signal(signal.SIGTERM)
    wait_until(lambda: any(redis_client.hget(key, "shutdown_requested_date")
                           for key in redis_client.smembers("rq:workers")), 10)  # fmt: skip
    asked = time.monotonic()
    wait_until(lambda: time.monotonic() - asked > 1.2, 5)  # rq ignores a second signal within 1 s
    victim.process.send_signal(signal.SIGTERM)
    assert victim.process.wait(timeout=20) >= 0
    after = states(redis_client, sends)
    (hung,) = [mid for mid, state in after.items() if state == "unknown"]
    rec = load(redis_client, sends[hung])
    assert "interrupted" in str(rec.status()["history"][-1]), rec.status()["history"][-1]
    assert set(after.values()) <= {"delivered", "unknown", "deferred"}, after
    assert all(load(redis_client, s).data_out is None for s in sends.values())
    assert redis_client.zcard("dispatch:inflight") == 0
    wait_due(redis_client, sends)
    burst(env, "--connections", "3")
    final = states(redis_client, sends)
    assert final == {mid: "unknown" if mid == hung else "delivered" for mid in sends}
    assert copies(server, accepted=True) == Counter({mid: 1 for mid in sends if mid != hung})
    assert copies(server, accepted=False)[hung] == 1


def test_the_worker_status_shows_each_connection() -> None:
    settings = load_settings({"SMTP_URL": "smtp://127.0.0.1:2525?tls=off"}, need_routes=True)
    runtime = Runtime(settings, connections=3)
    assert runtime.describe()["default"]["connections"] == []
    clients = runtime.lane_clients("default", 3)
    assert len({id(c) for c in clients}) == 3 and clients[0] is runtime.client("default")
    route = runtime.describe()["default"]
    assert route["connections_per_process"] == 3
    assert (
        route["connections"]
        == [{"state": "new", "conn_id": "", "tls": None, "messages_on_connection": 0}] * 3
    )


def test_connections_below_one_is_refused_with_a_clear_error(redis_url: str) -> None:
    env = process_env(env_for(redis_url, "smtp://127.0.0.1:2525?tls=off"))
    args = [PYTHON, "worker.py", "--burst", "--connections", "0"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, env=env, timeout=60)
    assert done.returncode == 2
    assert "--connections must be at least 1" in done.stderr.decode()


def test_a_job_timeout_mid_batch_over_three_connections_records_each_send_once(
    scripted_server: Scripted, redis_url: str, redis_client: redis.Redis
) -> None:
    """rq's own job timeout (SIGALRM, raised in the job's thread) while one connection waits at its final
    dot: that message is *unknown* ("attempt interrupted: JobTimeoutException"), the other connections'
    sends are recorded as they ended, and nothing is left unrecorded or sent twice."""
    server = scripted_server(faults={"data_end": Fault("hang")}, faults_on_connection=1)
    sends = enqueue(redis_client, 9)
    job = Queue("mail-default", connection=redis_client, serializer=JSONSerializer).get_jobs()[0]
    settings = load_settings(env_for(redis_url, smtp_url(server.port, timeout=120)), need_routes=True)
    batch = Batch(Runtime(settings, connections=3), redis_client, [(job.id, s) for s in job.args[0]])
    with pytest.raises(JobTimeoutException), UnixSignalDeathPenalty(3, JobTimeoutException):
        batch.run()
    assert sorted(batch.results) == sorted(sends.values())  # every send recorded by the batch itself
    after = states(redis_client, sends)
    (hung,) = [mid for mid, state in after.items() if state == "unknown"]
    assert (
        load(redis_client, sends[hung]).status()["reason"]["text"]
        == "attempt interrupted: JobTimeoutException"
    )
    assert set(after.values()) <= {"delivered", "unknown", "deferred"}, after
    assert all(load(redis_client, s).data_out is None for s in sends.values())
    assert copies(server, accepted=True) == Counter({mid: 1 for mid, s in after.items() if s == "delivered"})
    assert copies(server, accepted=False)[hung] == 1
    batch.runtime.close()


# -- a process with K connections adopts up to K - 1 more queued jobs (dispatcher.worker.adoption) ------


def queued_jobs(connection: redis.Redis) -> list[Job]:
    return Queue("mail-default", connection=connection, serializer=JSONSerializer).get_jobs()


def test_one_process_with_k_connections_runs_k_queued_jobs_at_once(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis
) -> None:
    """Four jobs of 10, K = 3: the first job adopts the next two (K - 1), which rq records as finished and
    adopted; their 30 sends go out with the first job's 10 over the 3 connections, each once, each
    recorded under the job its record names; the fourth job runs after them."""
    sink = smtp_server()
    groups = [enqueue(redis_client, 10) for _ in range(4)]
    first, second, third, fourth = (job.id for job in queued_jobs(redis_client))
    burst(env_for(redis_url, smtp_url(sink.port)), "--connections", "3")
    sends = {mid: send_id for group in groups for mid, send_id in group.items()}
    assert Counter(str(message_id_of(m.data)) for m in sink.messages) == Counter(dict.fromkeys(sends, 1))
    assert sink.max_active_connections == 3
    records = {send_id: load(redis_client, send_id) for send_id in sends.values()}
    assert {(rec.state, rec.attempts) for rec in records.values()} == {("delivered", 1)}
    jobs = {job_id: Job.fetch(job_id, connection=redis_client, serializer=JSONSerializer)
            for job_id in (first, second, third, fourth)}  # fmt: skip
    assert {job.get_status() for job in jobs.values()} == {"finished"}
    assert jobs[second].return_value() == jobs[third].return_value() == {"adopted_by": first}
    outcome = jobs[first].return_value()
    assert set(outcome["sends"]) == set(groups[0].values())
    assert set(outcome["adopted"]) == {second, third}
    assert set(outcome["adopted"][second]) == set(groups[1].values())
    assert set(jobs[fourth].return_value()["sends"]) == set(groups[3].values())
    for index, job_id in enumerate((first, second, third, fourth)):
        assert {records[s].rq_job for s in groups[index].values()} == {job_id}
    assert redis_client.zcard("dispatch:inflight") == 0


def test_adoption_takes_jobs_in_queue_order_within_the_bound_and_puts_back_the_one_past_it(
    redis_client: redis.Redis,
) -> None:
    """``adopt`` with room for 25 sends: the next job of 20 and the one of 5 are taken (leased, finished as
    adopted); with room for 10, the job of 20 goes back to the head of the queue and nothing is taken."""
    adopter = enqueue(redis_client, 1)
    big, small, last = enqueue(redis_client, 20), enqueue(redis_client, 5), enqueue(redis_client, 3)
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    head = queue.get_jobs()[0]
    assert queue.pop_job_id() == head.id  # as rq's dequeue pops the adopting job
    order = queue.get_job_ids()
    assert adopt(redis_client, queue, head, jobs=5, sends=10, lease_seconds=30, worker_name="w") == []
    assert queue.get_job_ids() == order
    assert redis_client.zcard("dispatch:inflight") == 0
    taken = adopt(redis_client, queue, head, jobs=5, sends=25, lease_seconds=30, worker_name="w")
    assert [sorted(a.send_ids) for a in taken] == [sorted(big.values()), sorted(small.values())]
    assert queue.get_job_ids() == order[2:]
    assert {text(s) for s in redis_client.zrange("dispatch:inflight", 0, -1)} == {
        *big.values(),
        *small.values(),
    }
    for adopted in taken:
        job = Job.fetch(adopted.job_id, connection=redis_client, serializer=JSONSerializer)
        assert job.get_status() == "finished" and job.return_value() == {"adopted_by": head.id}
    assert {load(redis_client, s).state for s in (*adopter.values(), *last.values())} == {"queued"}


def test_redis_failing_mid_adoption_keeps_the_jobs_already_taken_over(redis_client: redis.Redis) -> None:
    """The second job's hash cannot be read (a key of the wrong type: Redis answers WRONGTYPE): adoption
    stops there and returns the first job, leased and finished — the adopter delivers it."""
    enqueue(redis_client, 1)
    first = enqueue(redis_client, 5)
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    head = queue.get_jobs()[0]
    assert queue.pop_job_id() == head.id
    redis_client.set("rq:job:broken", "not a hash")
    redis_client.rpush(queue.key, "broken")
    taken = adopt(redis_client, queue, head, jobs=5, sends=60, lease_seconds=30, worker_name="w")
    assert [sorted(a.send_ids) for a in taken] == [sorted(first.values())]
    assert {text(s) for s in redis_client.zrange("dispatch:inflight", 0, -1)} == set(first.values())


def test_handing_back_a_send_another_job_owns_leaves_that_jobs_lease_alone(redis_client: redis.Redis) -> None:
    """A batch (an adopted job, say) hands back a send whose record names another job, whose worker is
    sending it under its lease: the hand-back must not drop that lease, or the send would be left in
    ``sending`` with no owner once that worker died (found in review)."""
    (send_id,) = enqueue(redis_client, 1).values()
    store = SendStore(redis_client)
    rec = load(redis_client, send_id)
    rec.move(SendState.SENDING)
    rec.attempts += 1
    assert store.begin_attempt(rec, now=time.time(), lease_seconds=30) is not None
    assert requeue_unstarted(redis_client, [send_id], "batch-not-the-owner") == []
    assert redis_client.zscore("dispatch:inflight", send_id) is not None
    assert load(redis_client, send_id).state == "sending"
    reaped = reap_abandoned(redis_client, now=time.time() + 3600)  # once the owner's lease expires
    assert reaped == [send_id] and load(redis_client, send_id).state == "queued"


def test_a_single_sends_job_is_never_adopted(redis_client: redis.Redis) -> None:
    """A job of one send may be a retry or a scheduled send (``deferred``/``scheduled``): adopted and not
    reached, nothing would requeue it. So adoption stops at it and leaves it at the head of the queue."""
    enqueue(redis_client, 1)
    Producer(redis_client).enqueue(mail(["solo@example.org"], "solo"))
    enqueue(redis_client, 5)
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    head = queue.get_jobs()[0]
    assert queue.pop_job_id() == head.id
    order = queue.get_job_ids()
    assert adopt(redis_client, queue, head, jobs=5, sends=60, lease_seconds=30, worker_name="w") == []
    assert queue.get_job_ids() == order


def test_a_send_named_twice_in_a_batch_over_three_connections_is_attempted_once(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis
) -> None:
    """A job queued twice, or a batch naming a send twice, reaches the batch as the same pair twice: two
    lanes must not take it at once (the second would move a send already ``sending``)."""
    sink = smtp_server()
    sends = enqueue(redis_client, 2)
    (job,) = queued_jobs(redis_client)
    settings = load_settings(env_for(redis_url, smtp_url(sink.port)), need_routes=True)
    pairs = [(job.id, s) for s in job.args[0]]
    batch = Batch(Runtime(settings, connections=3), redis_client, [*pairs, *pairs])
    batch.run()
    batch.runtime.close()
    assert sorted(batch.results) == sorted(sends.values())
    assert Counter(str(message_id_of(m.data)) for m in sink.messages) == Counter(dict.fromkeys(sends, 1))


def test_a_warm_stop_signalled_while_a_worker_adopts_is_kept(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """rq's SIGTERM handler raises ``StopRequested`` when the worker is not busy, and adoption runs before
    rq marks it busy: the stop was swallowed by the adoption's error handling and lost (the worker went on
    taking jobs). The worker is busy while it adopts, so the stop is recorded and taken after the job.
    The signal lands while Redis holds the adoption's first write (``CLIENT PAUSE``)."""
    for _ in range(3):
        enqueue(redis_client, 2)
    queue = Queue("mail-default", connection=redis_client, serializer=JSONSerializer)
    head = queue.get_jobs()[0]
    assert queue.pop_job_id() == head.id
    settings = load_settings(env_for(redis_url, "smtp://127.0.0.1:9?tls=off"), need_routes=True)
    worker = MailWorker([queue], connection=redis_client, runtime=Runtime(settings, connections=3))
    watcher = redis.Redis.from_url(redis_url)

    def stop_while_held() -> None:
        wait_until(lambda: watcher.info("clients")["blocked_clients"] >= 1, 5, interval=0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    stopper = threading.Thread(target=stop_while_held)
    try:
        worker._install_signal_handlers()  # type: ignore[no-untyped-call]
        watcher.execute_command("CLIENT", "PAUSE", "1000", "WRITE")
        stopper.start()
        sends = worker._adopt_for(head, queue, own=2)
    finally:
        watcher.execute_command("CLIENT", "UNPAUSE")
        stopper.join()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        worker.runtime.close()
    assert worker._stop_requested
    assert sends == 4
