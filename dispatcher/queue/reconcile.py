"""Every send that is not final has exactly one live owner; the reconciler gives an owner to one that lost it.

The owners of a send that is not final (``queued``, ``scheduled``, ``deferred`` or ``sending``):

    queued in an rq queue list      rq:queue:mail-<p>                      the job waits for a worker
    scheduled                       rq:scheduled:mail-<p>                  rq's scheduler releases it when due
    being started by rq             rq:intermediate:… / rq:wip:mail-<p>    rq's own in-flight bookkeeping
    leased by a worker              dispatch:inflight                      ``recovery`` reaps expired leases

rq's started registry (``rq:wip``) counts as an owner only for ``older_than`` seconds after rq recorded the
job's execution: a live worker leases a job's sends milliseconds after that, so a send still waiting, with
no lease, on a job rq started longer ago lost its worker between the two (``kill -9`` there left it
waiting for rq's job timeout, an hour). The reconcile delay must therefore stay far above the time a
worker takes from rq's start of a job to its lease (the default, 60 s, is).

rq dequeues several queues with ``BLPOP``: a job popped by a worker that dies before rq records it as
started is in no list and no registry, and its sends (up to 20 for a batch) would wait forever — and so is
a job a worker with K connections pops to adopt (``worker.adoption``) if it dies before the MULTI that
leases the job's sends. The
reconciler, run in every worker's maintenance round (one worker at a time, under a short lock), looks at
sends that have been ``queued``/``scheduled``/``deferred`` for longer than ``older_than`` seconds, takes one
snapshot of every owner above, and gives each send that has none a job of its own (``reconciled`` in its
history). It never takes a send from a live owner: the send is moved only if its record still names the
job it was waiting on (WATCH), and a job that later runs anyway finds the record moved on to another job
and does nothing — so the worst a race can cost is a short delay, never a second delivery.
"""

from __future__ import annotations

import time
import uuid

import redis
import structlog
from rq.executions import Execution
from rq.intermediate_queue import IntermediateQueue
from rq.registry import ScheduledJobRegistry, StartedJobRegistry

from dispatcher.mail.fields import PRIORITIES
from dispatcher.queue.presence import Presence
from dispatcher.queue.producer import attempt_job_id, rq_queue, schedule_attempt
from dispatcher.queue.records import HistoryEntry, text
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore

logger = structlog.get_logger("dispatcher.queue.reconcile")

WAITING_STATES = (SendState.QUEUED, SendState.SCHEDULED, SendState.DEFERRED)
LOCK_SECONDS = 30
DEFAULT_LIMIT = 500


def owned_jobs(connection: redis.Redis, started_since: float | None = None) -> set[str]:
    """Every rq job id that a queue list, rq's in-flight bookkeeping or a registry holds right now; with
    ``started_since``, a job in rq's started registry only if rq recorded its execution at or after it."""
    pipe = connection.pipeline(transaction=False)
    for priority in PRIORITIES:
        queue = rq_queue(connection, priority)
        pipe.lrange(queue.key, 0, -1)
        pipe.lrange(IntermediateQueue.get_intermediate_queue_key(queue.key), 0, -1)
        pipe.zrange(ScheduledJobRegistry(queue=queue).key, 0, -1)  # type: ignore[no-untyped-call]
        pipe.zrange(StartedJobRegistry(queue=queue).key, 0, -1)
    found = pipe.execute()
    jobs = {text(job_id) for i, ids in enumerate(found) if i % 4 != 3 for job_id in ids}
    started = [text(entry) for ids in found[3::4] for entry in ids]  # "<job id>:<execution id>"
    if started_since is not None and started:
        pipe = connection.pipeline(transaction=False)
        for entry in started:
            pipe.hget(Execution.from_composite_key(entry, connection).key, "created_at")
        created = pipe.execute()
        started = [e for e, at in zip(started, created, strict=True) if at and float(at) >= started_since]
    return jobs | {entry.split(":", 1)[0] for entry in started}


def reconcile(
    connection: redis.Redis, *, older_than: float, now: float | None = None, limit: int = DEFAULT_LIMIT
) -> list[str]:
    """Give a new job to every send (at most ``limit`` a round) waiting longer than ``older_than`` seconds
    with no owner; returns their ids. A no-op while another worker holds the reconciler's lock."""
    now = time.time() if now is None else now
    store, presence = SendStore(connection), Presence(connection)
    token = uuid.uuid4().hex
    if not presence.take_reconciler_lock(token, LOCK_SECONDS):
        return []
    try:
        candidates = store.waiting_since(WAITING_STATES, now - older_than, limit)
        if not candidates:
            return []
        jobs = owned_jobs(connection, started_since=now - older_than)
        leased = store.leased()
        orphans = [
            rec.send_id
            for rec in store.load_many_tolerant(candidates)[0]  # the bad: recovery's
            if rec.state in WAITING_STATES and rec.send_id not in leased and (rec.rq_job or "") not in jobs
        ]
        done = [send_id for send_id in orphans[:limit] if _adopt(store, send_id, jobs, now)]
        if done:
            logger.warning("mail_reconciled", sends=done, reason="no queued, scheduled or running job")
        return done
    finally:
        presence.drop_reconciler_lock(token)


def _adopt(store: SendStore, send_id: str, jobs: set[str], now: float) -> bool:
    """A job of its own for ``send_id`` if its record still waits on a job nobody holds. Atomic."""
    with store.watching() as pipe:
        while True:
            try:
                store.watch_send(pipe, send_id)
                rec = store.load(send_id)
                if (
                    rec is None
                    or rec.state not in WAITING_STATES
                    or (rec.rq_job or "") in jobs
                    or store.is_leased(pipe, send_id)
                ):
                    pipe.reset()
                    return False
                lost_job = rec.rq_job
                pipe.multi()  # the state stays what it is: only the job that owns the send changes
                rec.note(HistoryEntry(at=now, event="reconciled", attempt=rec.attempts,
                                      generation=rec.generation, details={"lost_job": lost_job}))  # fmt: skip
                job_id = attempt_job_id(send_id, rec.generation, rec.attempts + 1, f"-r{int(now * 1000)}")
                when = rec.next_attempt_at if rec.next_attempt_at and rec.next_attempt_at > now else None
                schedule_attempt(pipe, store.redis, rec, job_id, when)
                store.stage_save(pipe, rec, now=now)
                store.execute(pipe)
                return True
            except redis.WatchError:
                continue
