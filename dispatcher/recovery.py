"""Crash recovery: a send whose worker died mid-attempt (its lease expired) is queued again.

The job that was running keeps rq's "started" status until rq's own registry cleanup (minutes); we do
not wait for it. Recipients the ledger holds are skipped by the next attempt, so only the ones not yet
accepted are sent again. The old rq job can never run the send afterwards: ``deliver`` ignores a job that
is not the send's current one.
"""

from __future__ import annotations

import time

import redis
import structlog

from dispatcher.producer import attempt_job_id, schedule_attempt
from dispatcher.store import INFLIGHT, SendStore, send_key, text

logger = structlog.get_logger("dispatcher.recovery")


def reap_abandoned(connection: redis.Redis, *, now: float | None = None) -> list[str]:
    """Requeue every send whose in-flight lease has expired; returns their ids."""
    now = time.time() if now is None else now
    expired = [text(m) for m in connection.zrangebyscore(INFLIGHT, "-inf", now)]
    store = SendStore(connection)
    requeued: list[str] = []
    for send_id in expired:
        with connection.pipeline(transaction=True) as pipe:
            try:
                pipe.watch(INFLIGHT, send_key(send_id))  # type: ignore[no-untyped-call]
                score = pipe.zscore(INFLIGHT, send_id)
                rec = store.load(send_id)
                if score is None or score > now:
                    continue
                pipe.multi()
                pipe.zrem(INFLIGHT, send_id)
                if rec is not None and rec.state == "sending":
                    rec.state = "queued"
                    note = "worker stopped mid-attempt; requeued for recipients not yet accepted"
                    event: dict[str, object] = {"attempt": rec.attempts, "generation": rec.generation}
                    event.update(at=now, event="worker_lost", reply=note)
                    rec.record.setdefault("history", []).append(event)
                    job_id = attempt_job_id(send_id, rec.generation, rec.attempts, "-recovered")
                    schedule_attempt(pipe, connection, rec, job_id, None)
                    store.stage_save(pipe, rec, now=now)
                    requeued.append(send_id)
                pipe.execute()
            except redis.WatchError:
                continue
            except (ValueError, KeyError, TypeError) as exc:  # one broken record must not stop the others
                logger.exception("recovery_skipped", send_id=send_id, error=str(exc))
    if requeued:
        logger.warning("mail_requeued_after_worker_loss", sends=requeued)
    return requeued
