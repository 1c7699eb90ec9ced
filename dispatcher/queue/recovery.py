"""Crash recovery: sends whose worker died (their in-flight lease expired) are queued again.

Every send of a running job is in ``dispatch:inflight`` with a lease the job keeps fresh. When a worker is
killed, the leases of the send it was delivering and of the ones its job had not reached yet expire, and
any live worker's maintenance requeues them — each in a job of its own. Recipients the ledger holds are
skipped by the next attempt, so only the ones not yet accepted are sent again. The dead job can never run
a send afterwards: ``deliver`` ignores a job that is not the send's current one.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis
import structlog

from dispatcher.queue.producer import attempt_job_id, schedule_attempt
from dispatcher.queue.states import SendState
from dispatcher.queue.store import INFLIGHT, SendStore, send_key, text

logger = structlog.get_logger("dispatcher.queue.recovery")
LOST_STATES = (SendState.SENDING, SendState.QUEUED)


def requeue(
    connection: redis.Redis, send_id: str, *, from_job: str | None, reason: str, now: float | None = None
) -> bool:
    """Queue ``send_id`` again in a job of its own if it is still waiting on a job that will not deliver
    it (``from_job``, or any job when None); drop it from the in-flight set either way. Atomic."""
    now = time.time() if now is None else now
    store = SendStore(connection)
    with connection.pipeline(transaction=True) as pipe:
        while True:
            try:
                pipe.watch(INFLIGHT, send_key(send_id))  # type: ignore[no-untyped-call]
                rec = store.load(send_id)
                pipe.multi()
                pipe.zrem(INFLIGHT, send_id)
                lost = rec is not None and rec.state in LOST_STATES
                if rec is not None and lost and (from_job is None or rec.rq_job == from_job):
                    rec.move(SendState.QUEUED)
                    event: dict[str, object] = {"attempt": rec.attempts, "generation": rec.generation}
                    event.update(at=now, event=reason)
                    rec.record.setdefault("history", []).append(event)
                    job_id = attempt_job_id(send_id, rec.generation, rec.attempts + 1, f"-{int(now * 1000)}")
                    schedule_attempt(pipe, connection, rec, job_id, None)
                    store.stage_save(pipe, rec, now=now)
                    pipe.execute()
                    return True
                pipe.execute()
                return False
            except redis.WatchError:
                continue


def requeue_unstarted(connection: redis.Redis, send_ids: Iterable[str], job_id: str) -> list[str]:
    """The sends a stopping batch job did not reach: each gets a job of its own, now."""
    done = []
    for send_id in send_ids:
        try:
            if requeue(connection, send_id, from_job=job_id, reason="batch_stopped"):
                done.append(send_id)
        except redis.RedisError as exc:  # their leases expire; the reaper gets them
            logger.warning("requeue_failed", send_id=send_id, error=str(exc))
    if done:
        logger.info("mail_requeued_from_stopped_batch", sends=done, job_id=job_id)
    return done


def reap_abandoned(connection: redis.Redis, *, now: float | None = None) -> list[str]:
    """Requeue every send whose in-flight lease has expired; returns their ids."""
    now = time.time() if now is None else now
    expired = [text(m) for m in connection.zrangebyscore(INFLIGHT, "-inf", now)]
    requeued: list[str] = []
    for send_id in expired:
        try:
            if requeue(connection, send_id, from_job=None, reason="worker_lost", now=now):
                requeued.append(send_id)
        except (ValueError, KeyError, TypeError) as exc:  # one broken record must not stop the others
            logger.exception("recovery_skipped", send_id=send_id, error=str(exc))
    if requeued:
        logger.warning("mail_requeued_after_worker_loss", sends=requeued)
    return requeued
