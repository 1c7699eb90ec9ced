"""One delivery attempt of one send, recorded before it returns (``Attempt``).

An attempt loads the send, skips every recipient the ledger says accepted it, sends to the rest over the
process's kept ``SmtpClient`` for the mail's route (through the route's limits and breaker,
``routes.gate``), turns the outcome into per-recipient verdicts (``delivery.verdicts``), and in ONE atomic
Redis write adds the newly accepted recipients to the ledger, saves the record, drops the lease and
schedules the next attempt when one is due (``SendStore.record_outcome``, one script; with a next attempt,
that script inside the MULTI carrying rq's schedule) — or, when Redis stays away past half the lease,
journals the outcome (``delivery.journal``).
``prepare`` / ``complete`` split it around the SMTP exchange so a batch can stream several sends over one
connection (``jobs``).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections.abc import Callable
from typing import Any

import redis
import structlog

from dispatcher.delivery.journal import Entry
from dispatcher.delivery.verdicts import (
    Verdict,
    backoff_delay,
    final_state,
    reason_for,
    retry_hint,
    verdict_for_error,
    verdict_for_reply,
    verdicts_after_error,
)
from dispatcher.errors import ConfigurationError, QueueUnavailable, SmtpError, ValidationError
from dispatcher.mail.message import Mail
from dispatcher.mail.mime import build_message
from dispatcher.queue.producer import attempt_job_id, schedule_attempt
from dispatcher.queue.records import DeliveryStatus, HistoryEntry, RecipientRecord, SendRecord
from dispatcher.queue.recovery import UNREADABLE, describe_unreadable, load_readable, quarantine
from dispatcher.queue.states import FINAL_STATES, SendState
from dispatcher.queue.store import SendStore
from dispatcher.routes.gate import RoutePause
from dispatcher.smtp.outcomes import RecipientStatus, SendResult
from dispatcher.smtp.stream import Outgoing
from dispatcher.worker.runtime import Runtime

logger = structlog.get_logger("dispatcher.delivery.attempt")
_rng = random.SystemRandom()


class Attempt:
    def __init__(self, runtime: Runtime, connection: redis.Redis, job_id: str, send_id: str) -> None:
        self.runtime = runtime
        self.redis = connection
        self.job_id = job_id
        self.send_id = send_id
        self.started = time.time()
        self.pause: RoutePause | None = None
        """Set when the route held this attempt back (``_throttled``)."""
        self.write_retries = 0
        """How often writing the outcome had to be tried again (Redis away; ``outcome_write_retry``)."""
        self.journaled = False
        """Whether the outcome went to the outcome journal (Redis away past half the lease)."""

    @property
    def store(self) -> SendStore:
        """The store of the thread running this call (``SendStore.for_attempts``): an attempt prepared in one
        thread may be completed in another (a lane takes the batch's first send; the job's thread goes on
        with the send a lane held), and a held connection belongs to one thread."""
        return SendStore.for_attempts(self.redis)

    def run(self) -> dict[str, Any]:
        """The whole attempt: prepare, send through the route gate, record."""
        done = self.prepare()
        return done if done is not None else self.send_prepared()

    def send_prepared(self) -> dict[str, Any]:
        """Send a prepared attempt on its own (through the route gate) and record it."""
        verdicts, conn_id = self._send(self.rec, self.pending)
        return self._finish(self.rec, verdicts, conn_id, self.started)

    def outgoing(self) -> Outgoing:
        """A prepared attempt's message for ``SmtpClient.send_stream``."""
        assert self.rec.raw is not None
        return Outgoing(self.send_id, self.rec.sender, tuple(self.pending), self.rec.raw, self.context)

    def prepare(self) -> dict[str, Any] | None:
        """Load the send and begin the attempt (in flight, ledger read). Returns the attempt's summary when
        there is nothing to send (missing, stale job, every recipient already accepted); otherwise None,
        and ``rec`` / ``pending`` / ``context`` say what to send.

        A record that cannot be read (``queue.recovery.UNREADABLE``), or whose stored mail is not UTF-8
        JSON, is quarantined as ``broken`` with the reason ``unreadable record: …`` — never handed back to
        be requeued (a hot loop of jobs)."""
        try:
            rec = load_readable(self.store, self.send_id, whole=True)
        except UNREADABLE as exc:
            error = describe_unreadable(exc)
            return quarantine(self.redis, self.send_id, error, job_id=self.job_id)
        if rec is None:
            logger.warning("mail_missing", send_id=self.send_id, job_id=self.job_id)
            return {"id": self.send_id, "state": "missing"}
        if rec.state in FINAL_STATES or (rec.rq_job and rec.rq_job != self.job_id):
            logger.info("mail_stale_job", send_id=self.send_id, job_id=self.job_id, state=rec.state)
            return {"id": self.send_id, "state": rec.state, "stale_job": True}
        self.rec = rec
        self.context: dict[str, object] = {
            "job_id": self.job_id, "send_id": self.send_id, "message_id": rec.message_id,
            "attempt": rec.attempts + 1, "route": rec.route, "worker": self.runtime.worker_name,
        }  # fmt: skip
        self.bind()
        self.started = time.time()
        begun = self._begin(rec, self.started)
        if begun is None:  # the send moved on between our read and our begin: its new owner sends it
            logger.info("mail_stale_job", send_id=self.send_id, job_id=self.job_id, state=rec.stored_state)
            return {"id": self.send_id, "state": str(rec.stored_state), "stale_job": True}
        ledger, legacy_source = begun
        source = rec.source if rec.source is not None else legacy_source
        for recipient in rec.recipients:
            if recipient.casefold() in ledger:
                known = rec.outcomes.get(recipient, RecipientRecord())
                rec.outcomes[recipient] = dataclasses.replace(known, status=DeliveryStatus.ACCEPTED)
        self.pending = [r for r in rec.recipients if rec.status_of(r).open]
        if not self.pending:
            return self._finish(rec, {}, "", self.started)
        if rec.raw is None:
            try:
                if source is None:
                    raise ValueError("the stored mail is missing")
                data = json.loads(source.decode())
            except ValueError as exc:  # not UTF-8 (UnicodeDecodeError), not JSON, or gone
                return quarantine(self.redis, self.send_id, describe_unreadable(exc), job_id=self.job_id)
            try:
                rec.raw = build_message(Mail.from_dict(data))
            except (ValidationError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
                detail = f"cannot be written as MIME: {exc}"
                verdict = Verdict(RecipientStatus.PERMANENT, None, None, "message", detail)
                return self._finish(rec, dict.fromkeys(self.pending, verdict), "", self.started)
        return None

    def data_going_out(self) -> None:
        """Called right before the first byte of this attempt's data is written: from here on the message
        may be delivered, so that is durable first (a worker killed now leaves the send *unknown*, never
        sent again blindly — ``queue.recovery``)."""
        self.store.mark_data_out(self.send_id, self.rec.attempts)

    def bind(self) -> None:
        """This attempt's fields on every log event from here on."""
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(**self.context)

    def complete(
        self, outcome: SendResult | SmtpError, conn_id: str, transcript: tuple[dict[str, object], ...]
    ) -> dict[str, Any]:
        """Record a prepared attempt whose message went out in a stream (``SmtpClient.send_stream``)."""
        self.bind()
        verdicts = self._error_verdicts(outcome) if isinstance(outcome, SmtpError) else _verdicts(outcome)
        if not all(v.status is RecipientStatus.ACCEPTED for v in verdicts.values()):
            self.rec.transcript = list(transcript)
        return self._finish(self.rec, verdicts, conn_id, self.started)

    def _error_verdicts(self, exc: SmtpError) -> dict[str, Verdict]:
        """Each pending recipient's verdict after ``exc``. Nothing of the message offered (route trouble
        in the set-up, a 421 or a drop before MAIL was answered): the attempt is given back — the
        message's age still runs, so a route that never recovers ends it ``exhausted`` at ``max_age``."""
        if not exc.offered:
            self.rec.attempts -= 1
        return verdicts_after_error(exc, self.pending, self.runtime.settings.retry)

    def throttled(self, route: str, pause: RoutePause) -> dict[str, Any]:
        """Record a prepared attempt the route's limits kept from going out (streams ask per message)."""
        return self._finish(self.rec, self._throttled(route, pause), "", self.started)

    def _throttled(self, route: str, pause: RoutePause) -> dict[str, Verdict]:
        """Waiting for the route's limits is not an attempt, and not the message's age: the attempt is
        given back, and ``_finish`` defers the send until the pause ends, never failing it unsent."""
        self.rec.attempts -= 1
        if self.rec.attempts == 0:  # never offered yet: its age starts at the first real offer
            self.rec.first_attempt_at = None
        self.pause = pause
        logger.info("mail_throttled", route=route, reason=pause.reason, resumes_at=pause.until)
        return dict.fromkeys(
            self.pending, Verdict(RecipientStatus.TRANSIENT, None, None, "throttled", pause.reason)
        )

    def interrupted(self, data_written: bool, conn_id: str, exc: BaseException) -> dict[str, Any]:
        """Record an attempt cut off by a job timeout or a cold shutdown: unknown once its data was out."""
        status = RecipientStatus.UNKNOWN if data_written else RecipientStatus.TRANSIENT
        detail = f"attempt interrupted: {type(exc).__name__}"
        verdict = Verdict(status, None, None, "interrupted", detail)
        return self._finish(self.rec, dict.fromkeys(self.pending, verdict), conn_id, self.started)

    def _begin(self, rec: SendRecord, now: float) -> tuple[set[str], bytes | None] | None:
        """Mark the send in flight under a lease; read its ledger and (unless the MIME bytes are stored)
        the mail to build them from, as stored (bytes: ``prepare`` decodes it) — in one script, and only if
        the record still names the job and state it was read with (None otherwise: the send moved on)."""
        rec.move(SendState.SENDING)
        rec.attempts += 1
        if rec.first_attempt_at is None:
            rec.first_attempt_at = now
        return self.store.begin_attempt(rec, now=now, lease_seconds=self.runtime.settings.lease_seconds)

    def _send(self, rec: SendRecord, pending: list[str]) -> tuple[dict[str, Verdict], str]:
        settings = self.runtime.settings
        # The route's shared limits and breaker (routes.gate): waits stay well inside the job timeout.
        gate = self.runtime.gate(self.redis)
        refused: SmtpError | None = None
        for route in gate.candidates(rec.route):
            try:
                client = self.runtime.client(route, self.redis)
            except ConfigurationError as exc:
                return dict.fromkeys(pending, verdict_for_error(exc, settings.retry)), ""
            assert rec.raw is not None
            deferred = gate.admit(route, client)
            if deferred is not None:
                return self._throttled(route, deferred), ""
            if route != rec.route:
                rec.delivered_via = route
                logger.info("mail_failover", primary=rec.route, fallback=route)
            try:
                with gate.using(client):
                    result = client.send(rec.sender, pending, rec.raw, before_data=self.data_going_out)
            except SmtpError as exc:
                # Only a connection-level failure (before MAIL FROM: nothing offered) may move the send on.
                if gate.failed(route, client, exc):
                    refused = exc
                    rec.transcript = list(client.last_transcript)
                    continue
                rec.transcript = list(client.last_transcript)
                return self._error_verdicts(exc), client.conn_id
            except BaseException as exc:
                # A job timeout or a cold shutdown interrupted us mid-dialogue: never reuse that connection.
                in_flight = client.data_in_flight
                client.abort()
                rec.transcript = list(client.last_transcript)
                self.interrupted(in_flight, client.conn_id, exc)
                raise
            gate.answered(route, client)
            verdicts = _verdicts(result)
            if not all(o.status is RecipientStatus.ACCEPTED for o in result.outcomes):
                rec.transcript = list(result.transcript)
            return verdicts, result.conn_id
        # Every candidate failed at the connection level (nothing was offered to any of them).
        assert refused is not None
        return self._error_verdicts(refused), ""

    def _finish(
        self, rec: SendRecord, verdicts: dict[str, Verdict], conn_id: str, started: float
    ) -> dict[str, Any]:
        now = time.time()
        retry = self.runtime.settings.retry
        for recipient, verdict in verdicts.items():
            rec.outcomes[recipient] = verdict.to_record(now)
        statuses = [rec.status_of(r) for r in rec.recipients]
        first = rec.first_attempt_at if rec.first_attempt_at is not None else now
        held = self.pause is not None
        can_retry = held or (rec.attempts < retry.max_attempts and now - first < retry.max_age)
        rec.move(final_state(statuses, can_retry))
        failed = [v for v in verdicts.values() if v.status is not RecipientStatus.ACCEPTED]
        deciding = failed[-1] if failed else next(iter(verdicts.values()), None)
        if deciding is not None and deciding.reply is not None:
            rec.last_reply = deciding.reply.to_dict()
        rec.reason = reason_for(rec) if rec.state is not SendState.DELIVERED else None
        ms = round((now - started) * 1000, 1)
        rec.note(HistoryEntry(
            at=now, attempt=rec.attempts, generation=rec.generation, ms=ms, conn_id=conn_id,
            worker=self.runtime.worker_name, job_id=self.job_id,
            outcomes={r: v.status.value for r, v in verdicts.items()}, reply=_describe(deciding),
        ))  # fmt: skip
        accepted = [r.casefold() for r, v in verdicts.items() if v.status is RecipientStatus.ACCEPTED]
        next_job: tuple[str, float] | None = None
        if rec.state == "deferred":
            hints = [h for v in failed if (h := retry_hint(v.reply)) is not None]
            delay = backoff_delay(retry, rec.attempts, max(hints) if hints else None, _rng)
            if self.pause is not None and self.pause.until is not None:
                delay = max(0.0, self.pause.until - now) + _rng.uniform(0, self.pause.spread)
            if held and rec.first_attempt_at is not None:  # the time held back is not the message's age
                rec.first_attempt_at += delay
            job_id = attempt_job_id(rec.send_id, rec.generation, rec.attempts + 1)
            if job_id == self.job_id:  # a throttled attempt was given back: never reuse the running job's id
                job_id = attempt_job_id(rec.send_id, rec.generation, rec.attempts + 1, f"-{int(now * 1000)}")
            next_job = (job_id, now + delay)
        else:
            rec.next_attempt_at = None
        rec.data_out = None
        stored_state = rec.stored_state

        def write() -> None:
            rec.stored_state = stored_state  # each try writes the same move between the state indexes
            if next_job is None:  # the common case: one script call, no transaction
                taken = self.store.record_outcome(rec, accepted, now=now, live=True)
            else:
                pipe = self.store.transaction()
                schedule_attempt(pipe, self.redis, rec, *next_job)
                self.store.stage_outcome(pipe, rec, accepted, now=now, live=True)
                taken = bool(self.store.execute(pipe)[-1])
            if not taken:  # its lease was gone and another attempt has the send: the ledger took the facts
                logger.warning("outcome_after_takeover", send_id=rec.send_id, attempt=rec.attempts,
                               state=rec.state, accepted=accepted)  # fmt: skip

        self._commit(write, lambda: Entry.of(rec, self.job_id, accepted, next_job, now))
        summary = {
            "id": rec.send_id,
            "state": rec.state,
            "attempts": rec.attempts,
            "ms": ms,
            "conn_id": conn_id,
            "recipients": {r: rec.status_of(r).value for r in rec.recipients},
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
            reason=rec.reason.to_dict() if rec.reason is not None else None,
        )
        return summary

    def _commit(self, write: Callable[[], None], entry: Callable[[], Entry]) -> None:
        """Write an attempt's outcome: one script call (``SendStore.record_outcome``), or the script in the
        MULTI that schedules the next attempt with rq. An outcome, once known, is not dropped because Redis
        is away: the write is tried again (backoff to 2 s) for up to half the lease, while this worker's
        lease still keeps recovery off the send; past that it goes to the host's outcome journal
        (``delivery.journal``), replayed once Redis answers — the send's ``data_out`` marker meanwhile
        keeps recovery from resending it."""
        deadline = time.monotonic() + self.runtime.settings.lease_seconds / 2
        delay = 0.1
        while True:
            try:
                write()
                return
            except QueueUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    self.runtime.journal().append(entry())
                    self.journaled = True
                    return
                self.write_retries += 1
                logger.warning("outcome_write_retry", send_id=self.send_id, error=str(exc), retry_in=delay)
                time.sleep(delay)  # Redis is away: wait before the next try (bounded by the deadline)
                delay = min(delay * 2, 2.0)


def _describe(verdict: Verdict | None) -> str | None:
    if verdict is None:
        return None
    return verdict.reply.summary() if verdict.reply else verdict.detail


def _verdicts(result: SendResult) -> dict[str, Verdict]:
    return {o.recipient: verdict_for_reply(o.status, o.stage.value, o.reply) for o in result.outcomes}
