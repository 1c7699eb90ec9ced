"""A worker with K connections runs up to K jobs at once: the queued jobs it adopts (``--connections K``).

rq runs one job at a time per worker. A batch of 20 spread over 16 connections keeps each of them busy for
a message or two and then idle until the slowest is done (one process with K = 16 reached 53 % of 16
processes at 100 ms RTT, issue 15). So before rq starts the job it dequeued, ``MailWorker.perform_job``
adopts up to K - 1 more jobs from the same queue, in queue order, while their sends together stay within
K x ``JOB_BATCH_SIZE``; the job then delivers every adopted send along with its own (``delivery.jobs``),
over the same lanes, under one lease keeper, within a job timeout that counts every send.

Who owns an adopted job's sends (the owners of ``queue.reconcile``):

1. rq's queue list, until the worker pops the job (``LPOP``).
2. Nobody, for the milliseconds between the pop and step 3 — the window rq's own dequeue has: a worker
   that dies here leaves sends waiting on a job that is in no list, which the reconciler gives a new job.
3. The worker's lease: one MULTI leases the sends (``dispatch:inflight``) and finishes the adopted job in
   rq (result ``{"adopted_by": <job id>}``, the job's own result TTL). From then on the lease owns them
   exactly as it owns the adopting job's own sends: their records still name the adopted job, which each
   attempt's begin script checks; a send the batch does not reach is handed back from that job; a dead
   worker's lease expires into recovery (``queue.recovery``).

Only the producer's batch jobs (``deliver_batch``) are adopted: their sends are ``queued``, which a batch that
does not reach them hands back and recovery requeues. A single send's job may be a retry or a scheduled send
(``deferred``, ``scheduled``): adopted and not reached, its send would wait on a finished job until the
reconciler found it. A popped job that is not a batch, not ours (``vetting.job_refusal``), that rq cannot
load, or whose sends would pass the bound goes back to the head of its queue (``LPUSH``) and adoption stops
there: rq's own dequeue takes it next, and fails a refused one with its reason as for any job. A popped id
whose job hash is gone is dropped, as rq's dequeue drops it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis
import structlog
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.utils import now

from dispatcher.errors import QueueUnavailable
from dispatcher.queue.producer import BATCH_FUNCTION, RESULT_TTL
from dispatcher.queue.records import text
from dispatcher.queue.store import SendStore
from dispatcher.worker.vetting import job_refusal, job_sends

logger = structlog.get_logger("dispatcher.worker.adoption")


@dataclass(frozen=True)
class Adopted:
    """A job taken over by another: its id (the one its sends' records name) and its send ids."""

    job_id: str
    send_ids: list[str]


def adopt(
    connection: redis.Redis, queue: Queue, adopter: Job, *, jobs: int, sends: int, lease_seconds: float,
    worker_name: str,
) -> list[Adopted]:  # fmt: skip
    """Take over up to ``jobs`` queued jobs of ``queue`` carrying ``sends`` sends at most, for ``adopter``.

    Redis failing (or anything else) stops the adoption there: the jobs taken over before are returned
    (leased and finished, they are the adopter's to deliver), a job popped but not yet taken over is the
    reconciler's."""
    adopted: list[Adopted] = []
    try:
        _adopt(connection, queue, adopter, adopted, jobs, sends, lease_seconds, worker_name)
    except (redis.RedisError, QueueUnavailable) as exc:
        logger.warning("adoption_stopped", job_id=adopter.id, adopted=len(adopted), error=str(exc))
    except Exception as exc:  # anything else stops it too; what was taken over stays the adopter's
        logger.exception("adoption_stopped", job_id=adopter.id, adopted=len(adopted), error=str(exc))
    if adopted:
        logger.info("jobs_adopted", job_id=adopter.id, adopted=[a.job_id for a in adopted],
                    sends=sum(len(a.send_ids) for a in adopted))  # fmt: skip
    return adopted


def _adopt(
    connection: redis.Redis, queue: Queue, adopter: Job, adopted: list[Adopted], jobs: int, sends: int,
    lease_seconds: float, worker_name: str,
) -> None:  # fmt: skip
    store = SendStore(connection)
    room = sends
    while len(adopted) < jobs and room > 0:
        popped = connection.lpop(queue.key)
        if popped is None:
            break
        job_id = text(popped)
        try:
            job = Job.fetch(job_id, connection=connection, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        except redis.RedisError:
            raise
        except Exception:  # undecodable: rq's dequeue fails it by id (MailWorker's dequeue)
            connection.lpush(queue.key, job_id)
            break
        send_ids = job_sends(job) if job_refusal(job) is None and job.func_name == BATCH_FUNCTION else None
        if send_ids is None or len(send_ids) > room:
            connection.lpush(queue.key, job_id)
            break
        _take_over(store, job, send_ids, adopter.id, time.time() + lease_seconds, worker_name)
        adopted.append(Adopted(job.id, send_ids))
        room -= len(send_ids)


def _take_over(
    store: SendStore, job: Job, send_ids: list[str], adopter: str, until: float, worker: str
) -> None:
    """Lease ``send_ids`` and finish ``job`` in rq, in one transaction (step 3 of the module docstring)."""
    job.started_at = job.ended_at = now()
    job._result = {"adopted_by": adopter}
    ttl = job.get_result_ttl(RESULT_TTL)
    pipe = store.transaction()
    store.stage_lease(pipe, send_ids, until)
    job._handle_success(ttl, pipeline=pipe, worker_name=worker)
    job.cleanup(ttl, pipeline=pipe, remove_from_queue=False)
    store.execute(pipe)
