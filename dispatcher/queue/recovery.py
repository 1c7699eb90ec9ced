"""Crash recovery: sends whose worker died (their in-flight lease expired) are queued again.

Every send of a running job is in ``dispatch:inflight`` with a lease the job keeps fresh. When a worker is
killed, the leases of the send it was delivering and of the ones its job had not reached yet expire, and
any live worker's maintenance requeues them — each in a job of its own. Recipients the ledger holds are
skipped by the next attempt, so only the ones not yet accepted are sent again. The dead job can never run
a send afterwards: ``deliver`` ignores a job that is not the send's current one.

Except once its data may be out: an attempt records ``data_out`` (durably, before the first byte of the
message data is written — ``delivery.attempt.data_going_out``), so a send whose worker died past that
point is not requeued but settled *unknown* (``settle_unknown``): the server may have accepted it, and a
resend could deliver it twice. The operator sees why and decides.

Unreadable records are quarantined once, never requeued: a record whose hash does not parse, or whose
mail cannot be read (not UTF-8, not JSON, fields of the wrong shape), can never be sent, so requeueing it
only makes a hot loop of rq jobs. Whoever meets one first — the attempt (``delivery.attempt``) or
recovery here — moves it to ``broken`` with the reason ``unreadable record: …`` (``quarantine``) and
drops its lease, so the reaper does not meet it again; the dashboard and ``status`` show it, only a
delete removes it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

import redis
import structlog

from dispatcher.errors import QueueUnavailable
from dispatcher.mail.fields import PRIORITIES
from dispatcher.queue.producer import attempt_job_id, schedule_attempt
from dispatcher.queue.records import DeliveryStatus, HistoryEntry, Reason, RecipientRecord, SendRecord
from dispatcher.queue.states import SendState
from dispatcher.queue.store import DECODE_ERRORS, SendStore
from dispatcher.smtp.stages import Stage

logger = structlog.get_logger("dispatcher.queue.recovery")
LOST_STATES = (SendState.SENDING, SendState.QUEUED)
UNREADABLE = DECODE_ERRORS
"""What reading a corrupt record raises (the store's decode errors)."""


def describe_unreadable(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:300]}"


def check_readable(rec: SendRecord) -> None:
    """Raise one of ``UNREADABLE`` unless every field an attempt reads has its shape."""
    if not isinstance(rec.mail, dict):
        raise TypeError("the record's mail must be a JSON object")
    recipients = rec.recipients
    if not isinstance(rec.message_id, str) or not isinstance(rec.sender, str):
        raise TypeError("message_id and sender must be strings")
    if not all(isinstance(r, str) for r in recipients):
        raise TypeError("recipients must be strings")


def load_readable(store: SendStore, send_id: str, *, whole: bool = False) -> SendRecord | None:
    """``store.load`` (``load_whole`` with ``whole``: the mail too), and ``check_readable`` on what it
    found; raises one of ``UNREADABLE``."""
    rec = store.load_whole(send_id) if whole else store.load(send_id)
    if rec is not None:
        check_readable(rec)
    return rec


def quarantine(
    connection: redis.Redis, send_id: str, error: str, *, job_id: str | None, now: float | None = None
) -> dict[str, Any]:
    """Move a send whose record cannot be read to ``broken``, with the reason ``unreadable record:
    <error>``, touching only the fields that can be written without reading the rest; drop its lease.
    A record already final, or whose stored state is not a state at all, is left as it is (logged).
    Atomic (WATCH on the record). Returns the attempt-style summary."""
    now = time.time() if now is None else now
    reason = f"unreadable record: {error}"
    store = SendStore(connection)
    with store.watching() as pipe:
        while True:
            try:
                store.watch_send(pipe, send_id, leases=False)
                raw = store.load_raw(send_id)
                stored = _state_of(raw)
                pipe.multi()
                store.stage_release(pipe, send_id)
                if stored is None or stored.final:
                    store.execute(pipe)
                    state = stored.value if stored is not None else ("missing" if not raw else "unreadable")
                    logger.error("mail_unreadable", send_id=send_id, job_id=job_id, state=state, error=error)
                    return {"id": send_id, "state": state, "reason": reason}
                target = stored.to(SendState.BROKEN)
                record = _json_object(raw.get(b"record"))
                record["reason"] = {"kind": "record", "stage": None, "code": None, "enhanced": None,
                                    "text": reason}  # fmt: skip
                history = record.get("history")
                history = history if isinstance(history, list) else []
                history.append({"at": now, "event": "unreadable_record", "job_id": job_id, "error": error})
                record["history"] = history[-50:]
                fields = {"state": target.value, "updated_at": repr(now), "next_attempt_at": "",
                          "record": json.dumps(record, separators=(",", ":"))}  # fmt: skip
                store.stage_fields(
                    pipe, send_id, fields, moved=(stored, target), priority=_priority_of(raw), now=now
                )
                store.execute(pipe)
                state = target.value
                logger.error("mail_unreadable", send_id=send_id, job_id=job_id, state=state, error=error)
                return {"id": send_id, "state": state, "reason": reason}
            except redis.WatchError:
                continue


def _state_of(raw: dict[Any, Any]) -> SendState | None:
    try:
        return SendState(raw[b"state"].decode())
    except (KeyError, ValueError, AttributeError):
        return None


def _json_object(value: object) -> dict[str, Any]:
    try:
        loaded = json.loads(value) if isinstance(value, bytes | str) else None
    except ValueError:
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _priority_of(raw: dict[Any, Any]) -> str | None:
    priority = _json_object(raw.get(b"mail")).get("priority", "default")
    return priority if priority in PRIORITIES else None


def requeue(
    connection: redis.Redis, send_id: str, *, from_job: str | None, reason: str, now: float | None = None
) -> bool:
    """Queue ``send_id`` again in a job of its own if it is still waiting on a job that will not deliver
    it (``from_job``, or any job when None), and drop its lease — unless its record names a job other than
    ``from_job``: that job's worker may hold the send under its own lease, which a stale job handing the
    send back must leave alone (the send would be left ``sending`` with no owner once that worker died).
    Atomic."""
    now = time.time() if now is None else now
    store = SendStore(connection)
    with store.watching() as pipe:
        while True:
            try:
                store.watch_send(pipe, send_id)
                try:
                    rec = load_readable(store, send_id)
                except UNREADABLE as exc:  # never requeue it: quarantine it once, with the reason
                    pipe.reset()
                    quarantine(connection, send_id, describe_unreadable(exc), job_id=from_job, now=now)
                    return False
                ours = rec is None or from_job is None or rec.rq_job == from_job
                pipe.multi()
                if ours:
                    store.stage_release(pipe, send_id)
                if rec is not None and ours and rec.state in LOST_STATES:
                    if rec.state is SendState.SENDING and rec.data_out == rec.attempts:
                        settle_unknown(rec, now)
                        store.stage_save(pipe, rec, now=now)
                        store.execute(pipe)
                        attempt = rec.attempts
                        logger.warning("mail_unknown_after_worker_loss", send_id=send_id, attempt=attempt)
                        return False
                    rec.move(SendState.QUEUED)
                    rec.note(HistoryEntry(at=now, event=reason, attempt=rec.attempts,
                                          generation=rec.generation))  # fmt: skip
                    job_id = attempt_job_id(send_id, rec.generation, rec.attempts + 1, f"-{int(now * 1000)}")
                    schedule_attempt(pipe, connection, rec, job_id, None)
                    store.stage_save(pipe, rec, now=now)
                    store.execute(pipe)
                    return True
                store.execute(pipe)
                return False
            except redis.WatchError:
                continue


def settle_unknown(rec: SendRecord, now: float) -> None:
    """The worker of ``rec``'s attempt died after that attempt's data went out (``data_out``): the server
    may have accepted it, so every recipient still open is *unknown* — never sent again blindly."""
    detail = (
        f"the worker died after the data of attempt {rec.attempts} went out: "
        "the message may have been delivered (not resent)"
    )
    stage = Stage.DATA_END.value
    unknown = RecipientRecord(DeliveryStatus.UNKNOWN, stage=stage, text=detail, kind="unknown", at=now)
    for recipient in rec.recipients:
        if rec.status_of(recipient).open:
            rec.outcomes[recipient] = unknown
    rec.reason = Reason(kind="unknown", text=detail, stage=stage)
    rec.note(HistoryEntry(at=now, event="worker_lost_after_data", attempt=rec.attempts,
                          generation=rec.generation))  # fmt: skip
    rec.data_out = None
    rec.next_attempt_at = None
    rec.move(SendState.UNKNOWN)


def requeue_unstarted(connection: redis.Redis, send_ids: Iterable[str], job_id: str) -> list[str]:
    """The sends a stopping batch job did not reach: each gets a job of its own, now."""
    done = []
    for send_id in send_ids:
        try:
            if requeue(connection, send_id, from_job=job_id, reason="batch_stopped"):
                done.append(send_id)
        except (redis.RedisError, QueueUnavailable) as exc:  # their leases expire; the reaper gets them
            logger.warning("requeue_failed", send_id=send_id, error=str(exc))
    if done:
        logger.info("mail_requeued_from_stopped_batch", sends=done, job_id=job_id)
    return done


def reap_abandoned(connection: redis.Redis, *, now: float | None = None) -> list[str]:
    """Requeue every send whose in-flight lease has expired; returns their ids."""
    now = time.time() if now is None else now
    expired = SendStore(connection).expired_leases(now)
    requeued: list[str] = []
    for send_id in expired:
        try:
            if requeue(connection, send_id, from_job=None, reason="worker_lost", now=now):
                requeued.append(send_id)
        except UNREADABLE as exc:  # one broken record must not stop the others
            logger.exception("recovery_skipped", send_id=send_id, error=str(exc))
    if requeued:
        logger.warning("mail_requeued_after_worker_loss", sends=requeued)
    return requeued
