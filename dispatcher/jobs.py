"""The rq jobs: delivery attempts, each recorded before the job returns.

``deliver(send_id)`` runs one attempt; ``deliver_batch(send_ids)`` runs one attempt for each send enqueued
together, in order, under one lease. An ``Attempt`` loads the send, skips every recipient the ledger says
accepted it, sends to the rest over the process's kept ``SmtpClient`` for the mail's route (through the
route's limits and breaker, ``routing``), turns the outcome into per-recipient verdicts (``policy``), and in
ONE Redis transaction: adds the newly accepted recipients to the ledger, saves the record, and schedules
the next attempt when one is due.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import redis
import structlog
from rq import get_current_job

from dispatcher.errors import ConfigurationError, SmtpError
from dispatcher.policy import (
    Verdict,
    backoff_delay,
    final_state,
    retry_hint,
    verdict_for_error,
    verdict_for_reply,
    verdicts_after_error,
)
from dispatcher.producer import attempt_job_id, schedule_attempt
from dispatcher.recovery import requeue_unstarted
from dispatcher.routing import RouteGate
from dispatcher.runtime import Runtime
from dispatcher.smtp.protocol import RecipientStatus
from dispatcher.store import (
    FINAL_STATES,
    INFLIGHT,
    LEDGER_TTL,
    SendRecord,
    SendStore,
    delivered_key,
    ledger_key,
    text,
)

logger = structlog.get_logger("dispatcher.jobs")
_rng = random.SystemRandom()
_RETRYABLE = {"pending", RecipientStatus.TRANSIENT.value}


def deliver(send_id: str) -> dict[str, Any]:
    """rq entry point for one send (referenced by name in its job)."""
    return deliver_batch([send_id])["sends"][send_id]  # type: ignore[no-any-return]


def deliver_batch(send_ids: list[str]) -> dict[str, Any]:
    """rq entry point for sends enqueued together: one attempt each, in order, on the kept connection.

    Every send of the batch is leased at once, so if the worker dies the reaper requeues the ones it did
    not finish. On a warm shutdown the batch stops after the current send and requeues the rest.
    """
    job = get_current_job()
    if job is None:
        raise RuntimeError("deliver_batch() must run inside an rq job")
    runtime = Runtime.current()
    seconds = runtime.settings.lease_seconds
    if len(send_ids) > 1:  # a lone send is leased by its attempt's first transaction
        job.connection.zadd(INFLIGHT, {send_id: time.time() + seconds for send_id in send_ids})
    results: dict[str, Any] = {}
    try:
        with LeaseKeeper.for_process(job.connection, seconds).hold(send_ids):
            for send_id in send_ids:
                if results and runtime.stop_requested():
                    break
                results[send_id] = Attempt(runtime, job.connection, job.id, send_id).run()
    finally:
        structlog.contextvars.clear_contextvars()
        rest = send_ids[len(results) :]
        if rest:
            requeue_unstarted(job.connection, rest, job.id)
    return {"sends": results}


class LeaseKeeper:
    """Keeps the in-flight lease of the send being delivered fresh; a killed worker stops refreshing it.

    One daemon thread per process (not one per job: starting and joining a thread per message costs more
    than the rest of the job's bookkeeping). ``_begin`` sets the first lease; this only extends it.
    """

    _instance: ClassVar[LeaseKeeper | None] = None

    def __init__(self, connection: redis.Redis, seconds: float) -> None:
        self._redis, self._seconds = connection, seconds
        self._current: list[str] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        threading.Thread(target=self._run, name="lease", daemon=True).start()

    @classmethod
    def for_process(cls, connection: redis.Redis, seconds: float) -> LeaseKeeper:
        if cls._instance is None:
            cls._instance = cls(connection, seconds)
        return cls._instance

    @contextlib.contextmanager
    def hold(self, send_ids: list[str]) -> Iterator[None]:
        """Refresh the leases of ``send_ids`` while inside; finished sends drop out of the in-flight set
        and ``XX`` keeps a refresh from bringing them back."""
        with self._lock:
            self._current = list(send_ids)
        try:
            yield
        finally:
            with self._lock:
                self._current = []

    def _run(self) -> None:
        while not self._wake.wait(self._seconds / 3):
            with self._lock:
                send_ids = self._current
            if not send_ids:
                continue
            expiry = time.time() + self._seconds
            try:
                self._redis.zadd(INFLIGHT, dict.fromkeys(send_ids, expiry), xx=True)
            except redis.RedisError as exc:
                logger.warning("lease_refresh_failed", sends=len(send_ids), error=str(exc))


class Attempt:
    def __init__(self, runtime: Runtime, connection: redis.Redis, job_id: str, send_id: str) -> None:
        self.runtime = runtime
        self.redis = connection
        self.store = SendStore(connection)
        self.job_id = job_id
        self.send_id = send_id
        self.started = time.time()

    def run(self) -> dict[str, Any]:
        rec = self.store.load(self.send_id)
        if rec is None:
            logger.warning("mail_missing", send_id=self.send_id, job_id=self.job_id)
            return {"id": self.send_id, "state": "missing"}
        if rec.state in FINAL_STATES or (rec.rq_job and rec.rq_job != self.job_id):
            logger.info("mail_stale_job", send_id=self.send_id, job_id=self.job_id, state=rec.state)
            return {"id": self.send_id, "state": rec.state, "stale_job": True}
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(
            job_id=self.job_id, send_id=self.send_id, message_id=rec.message_id, attempt=rec.attempts + 1,
            route=rec.route, worker=self.runtime.worker_name,
        )  # fmt: skip
        started = self.started = time.time()
        ledger = self._begin(rec, started)
        for recipient in rec.recipients:
            if recipient.casefold() in ledger:
                rec.outcomes.setdefault(recipient, {})["status"] = RecipientStatus.ACCEPTED.value
        pending = [
            r for r in rec.recipients if rec.outcomes.get(r, {}).get("status", "pending") in _RETRYABLE
        ]
        verdicts: dict[str, Verdict] = {}
        conn_id = ""
        if pending:
            verdicts, conn_id = self._send(rec, pending)
        return self._finish(rec, verdicts, conn_id, started)

    def _begin(self, rec: SendRecord, now: float) -> set[str]:
        """Mark the send in flight under a lease and read its ledger, in one transaction."""
        rec.state = "sending"
        rec.attempts += 1
        rec.record.setdefault("first_attempt_at", now)
        pipe = self.redis.pipeline(transaction=True)
        pipe.multi()  # explicit before rq sees the pipeline: its enqueue calls multi() when it is not
        pipe.smembers(ledger_key(rec.message_id))
        self.store.stage_save(pipe, rec, now=now)
        pipe.zadd(INFLIGHT, {rec.send_id: now + self.runtime.settings.lease_seconds})
        members = pipe.execute()[0]
        return {text(m).casefold() for m in members}

    def _send(self, rec: SendRecord, pending: list[str]) -> tuple[dict[str, Verdict], str]:
        settings = self.runtime.settings
        # The route's shared limits and breaker (dispatcher.routing): waits stay well inside the job timeout.
        gate = RouteGate.for_process(self.redis, settings.policies, settings.job_timeout_margin / 2)
        refused: SmtpError | None = None
        for route in gate.candidates(rec.route):
            try:
                client = self.runtime.client(route, self.redis)
            except ConfigurationError as exc:
                return dict.fromkeys(pending, verdict_for_error(exc, settings.retry)), ""
            if rec.raw is None:
                raise RuntimeError(f"send {rec.send_id} has no message bytes")
            deferred = gate.admit(route, client)
            if deferred is not None:
                # Waiting for the route's limits is not an attempt: give it back; _finish defers the send.
                rec.attempts -= 1
                logger.info("mail_throttled", route=route, reason=deferred)
                verdict = Verdict(RecipientStatus.TRANSIENT, None, None, "throttled", deferred)
                return dict.fromkeys(pending, verdict), ""
            if route != rec.route:
                rec.record["delivered_via"] = route
                logger.info("mail_failover", primary=rec.route, fallback=route)
            try:
                with gate.using(client):
                    result = client.send(rec.sender, pending, rec.raw)
            except SmtpError as exc:
                # Only a connection-level failure (before MAIL FROM: nothing offered) may move the send on.
                if gate.failed(route, exc):
                    refused = exc
                    rec.record["transcript"] = list(client.last_transcript)
                    continue
                rec.record["transcript"] = list(client.last_transcript)
                return verdicts_after_error(exc, pending, settings.retry), client.conn_id
            except BaseException as exc:
                # A job timeout or a cold shutdown interrupted us mid-dialogue: never reuse that connection.
                in_flight = client.data_in_flight
                client.abort()
                status = RecipientStatus.UNKNOWN if in_flight else RecipientStatus.TRANSIENT
                detail = f"attempt interrupted: {type(exc).__name__}"
                verdict = Verdict(status, None, None, "interrupted", detail)
                rec.record["transcript"] = list(client.last_transcript)
                self._finish(rec, dict.fromkeys(pending, verdict), client.conn_id, self.started)
                raise
            gate.answered(route, client, [o.reply for o in result.outcomes])
            verdicts = {
                o.recipient: verdict_for_reply(o.status, o.stage.value, o.reply) for o in result.outcomes
            }
            if not all(o.status is RecipientStatus.ACCEPTED for o in result.outcomes):
                rec.record["transcript"] = list(result.transcript)
            return verdicts, result.conn_id
        # Every candidate failed at the connection level (nothing was offered to any of them).
        assert refused is not None
        return dict.fromkeys(pending, verdict_for_error(refused, settings.retry)), ""

    def _finish(
        self, rec: SendRecord, verdicts: dict[str, Verdict], conn_id: str, started: float
    ) -> dict[str, Any]:
        now = time.time()
        policy = self.runtime.settings.retry
        for recipient, verdict in verdicts.items():
            rec.outcomes[recipient] = verdict.to_dict(now)
        statuses = [rec.outcomes.get(r, {}).get("status", "pending") for r in rec.recipients]
        first = float(rec.record.get("first_attempt_at", now))
        can_retry = rec.attempts < policy.max_attempts and now - first < policy.max_age
        rec.state = final_state(statuses, can_retry)
        failed = [v for v in verdicts.values() if v.status is not RecipientStatus.ACCEPTED]
        deciding = failed[-1] if failed else next(iter(verdicts.values()), None)
        if deciding is not None and deciding.reply is not None:
            rec.record["last_reply"] = deciding.reply.to_dict()
        rec.record["reason"] = self._reason(rec) if rec.state != "delivered" else None
        ms = round((now - started) * 1000, 1)
        history = rec.record.setdefault("history", [])
        history.append({
            "attempt": rec.attempts, "generation": rec.generation, "at": now, "ms": ms, "conn_id": conn_id,
            "worker": self.runtime.worker_name, "job_id": self.job_id,
            "outcomes": {r: v.status.value for r, v in verdicts.items()},
            "reply": _describe(deciding),
        })  # fmt: skip
        del history[:-50]
        accepted = [r.casefold() for r, v in verdicts.items() if v.status is RecipientStatus.ACCEPTED]
        pipe = self.redis.pipeline(transaction=True)
        pipe.multi()  # explicit before rq sees the pipeline: its enqueue calls multi() when it is not
        if accepted:
            pipe.sadd(ledger_key(rec.message_id), *accepted)
            pipe.expire(ledger_key(rec.message_id), LEDGER_TTL)
        if rec.state == "deferred":
            hints = [h for v in failed if (h := retry_hint(v.reply)) is not None]
            delay = backoff_delay(policy, rec.attempts, max(hints) if hints else None, _rng)
            job_id = attempt_job_id(rec.send_id, rec.generation, rec.attempts + 1)
            if job_id == self.job_id:  # a throttled attempt was given back: never reuse the running job's id
                job_id = attempt_job_id(rec.send_id, rec.generation, rec.attempts + 1, f"-{int(now * 1000)}")
            schedule_attempt(pipe, self.redis, rec, job_id, now + delay)
        else:
            rec.next_attempt_at = None
        if rec.state == "delivered":
            minute = int(now // 60)
            pipe.incr(delivered_key(minute))
            pipe.expire(delivered_key(minute), 3 * 3600)
        self.store.stage_save(pipe, rec, now=now)
        pipe.zrem(INFLIGHT, rec.send_id)
        pipe.execute()
        summary = {
            "id": rec.send_id,
            "state": rec.state,
            "attempts": rec.attempts,
            "ms": ms,
            "conn_id": conn_id,
            "recipients": {r: rec.outcomes.get(r, {}).get("status") for r in rec.recipients},
        }
        event = {"delivered": "mail_delivered", "deferred": "mail_deferred"}.get(
            rec.state, f"mail_{rec.state}"
        )
        log = logger.info if rec.state in ("delivered", "deferred") else logger.warning
        log(
            event,
            recipients=summary["recipients"],
            total_ms=ms,
            conn_id=conn_id,
            next_attempt_at=rec.next_attempt_at,
            reason=rec.record.get("reason"),
        )
        return summary

    @staticmethod
    def _reason(rec: SendRecord) -> dict[str, Any] | None:
        """Why the send is not delivered, in the shape the dashboard groups by: a permanent refusal first,
        then an unknown outcome, then a transient one (kind "exhausted" once retrying has stopped)."""
        rank = {"permanent": 0, "unknown": 1, "transient": 2}
        open_outcomes = [o for o in rec.outcomes.values() if o.get("status") in rank]
        if not open_outcomes:
            return None
        worst = min(open_outcomes, key=lambda o: rank[o["status"]])
        kind = worst.get("kind") or "message"
        if rec.state == "failed" and worst["status"] == "transient":
            kind = "exhausted"
        code, text = worst.get("code"), str(worst.get("text") or "").split("\n")[0]
        return {
            "kind": kind,
            "stage": worst.get("stage"),
            "code": code,
            "enhanced": worst.get("enhanced"),
            "text": f"{code} {text}" if code else text,
        }


def _describe(verdict: Verdict | None) -> str | None:
    if verdict is None:
        return None
    return verdict.reply.summary() if verdict.reply else verdict.detail
