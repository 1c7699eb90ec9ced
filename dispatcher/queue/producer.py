"""The producer API: validate mails, store them and enqueue their rq jobs — atomically, idempotently.

Each batch is one Redis transaction guarded by ``WATCH`` on its idempotency keys: either a mail's key,
record and rq job are all written, or none is. The same ``key`` enqueued again (now or scheduled) finds the
first send and creates nothing — rq alone would run a reused job id twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import ScheduledJobRegistry
from rq.serializers import JSONSerializer

from dispatcher import testing
from dispatcher.errors import IdempotencyConflict, PartiallyEnqueued, QueueUnavailable, ValidationError
from dispatcher.mail.fields import PRIORITIES, uses_template
from dispatcher.mail.limits import MAX_RECIPIENTS
from dispatcher.mail.message import DEFAULT_MAX_BYTES, Mail
from dispatcher.mail.mime import validated
from dispatcher.queue.presence import Presence
from dispatcher.queue.records import PENDING, SendRecord, mail_summary, new_send_id, tree_json
from dispatcher.queue.states import initial_state
from dispatcher.queue.store import OUTAGE, SendStore, unavailable

JOB_FUNCTION = "dispatcher.delivery.jobs.deliver"
BATCH_FUNCTION = "dispatcher.delivery.jobs.deliver_batch"
#: Sends enqueued together share one rq job of at most this many (rq's own bookkeeping costs about as
#: much CPU as a whole SMTP transaction; a batch pays it once). Retries and scheduled sends go alone.
JOB_BATCH_SIZE = 20
QUEUE_NAMES = tuple(f"mail-{priority}" for priority in PRIORITIES)
DEFAULT_JOB_TIMEOUT = 3600
RESULT_TTL = 86400
FAILURE_TTL = 7 * 86400
BATCH = 500
ROUTES_READ_INTERVAL = 5.0
_NOT_YET = ValidationError({"mail": "pending"})
"""The place of a valid mail in ``Producer.enqueue_many``'s results until its batch is stored (never
returned: each is replaced by its ``Enqueued``, or by None in a ``PartiallyEnqueued``)."""


def queue_name(priority: str) -> str:
    return f"mail-{priority}"


@dataclass(frozen=True, slots=True)
class Enqueued:
    """One mail accepted by the producer; ``duplicate`` when its key had been enqueued before."""

    id: str
    duplicate: bool
    message_id: str


def rq_queue(connection: redis.Redis, priority: str) -> Queue:
    return Queue(queue_name(priority), connection=connection, serializer=JSONSerializer)


def attempt_job_id(send_id: str, generation: int, attempt: int, suffix: str = "") -> str:
    """The rq job id of one attempt (rq allows letters, digits, ``_`` and ``-`` only)."""
    return f"{send_id}-g{generation}-a{attempt}{suffix}"


def enqueue_batch(
    pipe: Any, connection: redis.Redis, recs: Sequence[SendRecord], queue: Queue | None = None
) -> None:
    """Queue one rq job delivering ``recs`` (same priority) one after the other, on ``pipe`` (``queue``:
    their priority's ``rq_queue`` on ``connection``, when the caller keeps one)."""
    if queue is None:
        queue = rq_queue(connection, str(recs[0].mail.get("priority", "default")))
    job_id = f"batch-{uuid.uuid4().hex}"
    job = queue.create_job(
        BATCH_FUNCTION,
        args=([rec.send_id for rec in recs],),
        job_id=job_id,
        timeout=DEFAULT_JOB_TIMEOUT * len(recs),
        result_ttl=RESULT_TTL,
        failure_ttl=FAILURE_TTL,
        description=f"{len(recs)} mails from {recs[0].send_id}",
    )
    for rec in recs:
        rec.rq_job = job_id
        rec.next_attempt_at = None
    queue.enqueue_job(job, pipeline=pipe)


def schedule_attempt(
    pipe: Any, connection: redis.Redis, rec: SendRecord, job_id: str, when: float | None
) -> None:
    """Queue (or schedule, ``when`` in Unix seconds) the rq job for one attempt of ``rec`` on ``pipe``."""
    queue = rq_queue(connection, str(rec.mail.get("priority", "default")))
    job = queue.create_job(
        JOB_FUNCTION,
        args=(rec.send_id,),
        job_id=job_id,
        timeout=DEFAULT_JOB_TIMEOUT,
        result_ttl=RESULT_TTL,
        failure_ttl=FAILURE_TTL,
        description=f"mail {rec.send_id}",
    )
    rec.rq_job = job_id
    if when is not None and when > time.time():
        rec.next_attempt_at = when
        # rq's scheduled registry keeps whole seconds (it drops the fraction): round up, never fire early.
        _schedule_job(pipe, queue, job, math.ceil(when))
    else:
        rec.next_attempt_at = None
        queue.enqueue_job(job, pipeline=pipe)


def _schedule_job(pipe: Any, queue: Queue, job: Job, at: int) -> None:
    """rq's ``Queue.schedule_job``, every write of it on ``pipe``. rq 2.12's ``ScheduledJobRegistry.schedule``
    ignores the pipeline it is given and adds the job with the registry's own connection, at once: outside
    the transaction that records the outcome (an entry for a job the transaction may never save; a raw
    Redis error out of an outcome's staging when Redis is away)."""
    pipe.sadd(queue.redis_queues_keys, queue.key)
    job.set_status(JobStatus.SCHEDULED, pipeline=pipe)
    job.save(pipeline=pipe)
    job.cleanup(ttl=job.ttl, pipeline=pipe)
    pipe.zadd(ScheduledJobRegistry(queue=queue).key, {job.id: at})  # type: ignore[no-untyped-call]


class Producer:
    """Enqueue mails into Redis for the workers. Thread-safe as far as the redis client is."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_recipients: int = MAX_RECIPIENTS,
        templates_dir: str | Path | None = None,
    ) -> None:
        self.redis = connection
        self.store = SendStore(connection)
        self.max_bytes = max_bytes
        self.max_recipients = max_recipients
        self._routes: frozenset[str] = frozenset()
        self._routes_read_at: float | None = None
        self._queues: dict[str, Queue] = {}
        """``rq_queue`` of each priority, made once (rq checks its serializer each time it makes one)."""
        self.templates_dir = templates_dir
        """Root of the named templates; ``None``: ``DISPATCH_TEMPLATES_DIR``."""

    def validate(self, data: Mapping[str, Any] | Mail) -> Mail:
        """The mail checked field by field, and its ``route`` against the routes the live workers publish
        (``Presence.known_routes``): when some are published, any other route is a field error."""
        if isinstance(data, Mail) and data.raw:
            mail = data
        else:
            mapping = data.to_dict() if isinstance(data, Mail) else self.rendered(data)
            mail = validated(
                mapping, max_bytes=self.max_bytes, max_recipients=self.max_recipients, build=False
            )
        known = self.known_routes()
        if known and mail.route not in known:
            names = ", ".join(sorted(known))
            problem = f"no worker is configured with route {mail.route!r} (known: {names})"
            raise ValidationError({"route": problem})
        return mail

    def known_routes(self) -> frozenset[str]:
        """The published route names, read at most every ``ROUTES_READ_INTERVAL`` seconds. Redis trouble
        reads as none (the enqueue itself then reports it; a worker fails an unknown route anyway)."""
        if testing.capturing():  # an app's test outbox is open: touch no Redis
            return frozenset()
        now = time.monotonic()
        if self._routes_read_at is None or now - self._routes_read_at >= ROUTES_READ_INTERVAL:
            try:
                self._routes = Presence(self.redis).known_routes()
            except QueueUnavailable:
                return frozenset()
            self._routes_read_at = now
        return self._routes

    def rendered(self, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """``data`` with a named template rendered into it (subject, text, html), once, at enqueue."""
        if not isinstance(data, Mapping) or not uses_template(data):
            return data
        from dispatcher.mail import templates  # Jinja2 is loaded by the first mail that uses a template

        return templates.render(data, self.templates_dir or templates.default_root())

    def enqueue(self, data: Mapping[str, Any] | Mail) -> Enqueued:
        """Validate and enqueue one mail; ``ValidationError`` names every bad field and stores nothing."""
        done = self.enqueue_valid([self.validate(data)])[0]
        if isinstance(done, IdempotencyConflict):
            raise done
        return done

    def enqueue_many(self, items: Iterable[Mapping[str, Any] | Mail]) -> list[Enqueued | ValidationError]:
        """Enqueue many mails; each position holds its ``Enqueued`` or the ``ValidationError`` it got."""
        results: list[Enqueued | ValidationError] = []
        valid: list[tuple[int, Mail]] = []
        for item in items:
            try:
                valid.append((len(results), self.validate(item)))
                results.append(_NOT_YET)
            except ValidationError as exc:
                results.append(exc)
        for start in range(0, len(valid), BATCH):
            chunk = valid[start : start + BATCH]
            try:
                stored = self.enqueue_valid([m for _, m in chunk])
            except QueueUnavailable as exc:
                if start == 0:
                    raise  # nothing was enqueued
                settled: list[object] = list(results)
                for index, _ in valid[start:]:
                    settled[index] = None
                raise PartiallyEnqueued(
                    f"Redis became unreachable after {start} of {len(valid)} valid mails were enqueued "
                    f"(items from [{valid[start][0]}] on were not): {exc}",
                    settled,
                ) from exc
            for (index, _), done in zip(chunk, stored, strict=True):
                results[index] = done
        return results

    def enqueue_valid(self, mails: Sequence[Mail]) -> list[Enqueued | IdempotencyConflict]:
        """Store and enqueue already validated mails in one transaction (retried if a key races). A mail
        whose key names a different mail already is an ``IdempotencyConflict`` in its place."""
        if testing.capturing():  # an app's test outbox is open: record, touch no Redis
            for mail in mails:
                testing.record(mail)
            return [Enqueued(new_send_id(m.key), False, m.message_id) for m in mails]
        try:
            try:
                return self._transaction(mails)
            except OUTAGE as exc:  # rq's enqueue_job reaches Redis on its own, past the store's boundary
                raise unavailable(exc) from exc
        except QueueUnavailable as exc:
            if isinstance(exc.__cause__, redis.TimeoutError):
                raise QueueUnavailable(
                    f"Redis timed out, the batch may not be enqueued: {exc.__cause__}"
                ) from exc
            raise QueueUnavailable(f"Redis is unreachable, nothing was enqueued: {exc.__cause__}") from exc

    def _transaction(self, mails: Sequence[Mail]) -> list[Enqueued | IdempotencyConflict]:
        keys = [m.key for m in mails]
        with self.store.watching() as pipe:
            while True:
                try:
                    existing = self.store.watch_idempotency(pipe, (k for k in keys if k is not None))
                    pipe.multi()
                    results = self._stage(pipe, mails, keys, existing)
                    self.store.execute(pipe)
                    return results
                except redis.WatchError:
                    continue

    def _stage(
        self, pipe: Any, mails: Sequence[Mail], keys: Sequence[str | None], existing: dict[str, str]
    ) -> list[Enqueued | IdempotencyConflict]:
        now = time.time()
        results: list[Enqueued | IdempotencyConflict] = []
        claimed: dict[str, tuple[Enqueued, str]] = {}
        batches: dict[str, list[SendRecord]] = {}
        created: list[SendRecord] = []
        for mail, key in zip(mails, keys, strict=True):
            as_dict = mail.to_dict()
            fingerprint = mail_fingerprint(as_dict) if key is not None else ""
            if key is not None and key in existing:
                first_id, _, first_print = existing[key].partition(" ")
                same = not first_print or first_print == fingerprint  # keys stored before prints: trusted
                results.append(Enqueued(first_id, True, "") if same else IdempotencyConflict(first_id))
                continue
            if key is not None and key in claimed:
                first, first_print = claimed[key]
                duplicate = Enqueued(first.id, True, first.message_id)
                results.append(duplicate if first_print == fingerprint else IdempotencyConflict(first.id))
                continue
            send_id = new_send_id(mail.key)
            scheduled = mail.send_at is not None and mail.send_at.timestamp() > now
            source = None if mail.raw else tree_json(as_dict).encode()
            summary = mail_summary(mail, as_dict, in_place=True)  # as_dict is done with: no copy
            rec = SendRecord(
                send_id=send_id,
                mail=summary,
                raw=mail.raw or None,
                source=source,
                state=initial_state(scheduled),
                created_at=now,
                outcomes=dict.fromkeys(summary["envelope"]["recipients"], PENDING),
            )
            created.append(rec)
            if scheduled and mail.send_at is not None:
                schedule_attempt(pipe, self.redis, rec, send_id, mail.send_at.timestamp())
            elif len(mails) == 1:
                schedule_attempt(pipe, self.redis, rec, send_id, None)
            else:
                batch = batches.setdefault(mail.priority, [])
                batch.append(rec)
                if len(batch) == JOB_BATCH_SIZE:
                    enqueue_batch(pipe, self.redis, batches.pop(mail.priority), self._queue(mail.priority))
            if key is not None:
                self.store.stage_claim(pipe, key, send_id, fingerprint)
            done = Enqueued(send_id, False, mail.message_id)
            if key is not None:
                claimed[key] = (done, fingerprint)
            results.append(done)
        for priority, batch in batches.items():
            enqueue_batch(pipe, self.redis, batch, self._queue(priority))
        self.store.stage_new(pipe, created, now=now)
        return results


    def _queue(self, priority: str) -> Queue:
        queue = self._queues.get(priority)
        if queue is None:
            queue = self._queues[priority] = rq_queue(self.redis, priority)
        return queue


_NOT_FINGERPRINTED = frozenset({"message_id", "date", "send_at", "priority", "route"})


def mail_fingerprint(as_dict: Mapping[str, Any]) -> str:
    """What an idempotency key promises stays the same: what the mail says and to whom — not the
    Message-ID and Date validation fills in, nor when or how it goes (``send_at``, priority, route: a
    retried request may compute those anew)."""
    significant = {k: v for k, v in as_dict.items() if k not in _NOT_FINGERPRINTED}
    return hashlib.sha256(json.dumps(significant, sort_keys=True, default=str).encode()).hexdigest()[:24]


def connect(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)


def enqueue(mail: Mapping[str, Any], *, connection: redis.Redis) -> str:
    """Validate and enqueue one mail; return its id (the first id again for a duplicate ``key``)."""
    return Producer(connection).enqueue(mail).id


def enqueue_many(mails: Iterable[Mapping[str, Any]], *, connection: redis.Redis) -> list[str]:
    """Validate every mail first; if any is invalid raise a ``ValidationError`` naming every problem of
    every bad item by its index (``[3].to[0]``) and enqueue nothing."""
    producer = Producer(connection)
    validated: list[Mail] = []
    problems: dict[str, str] = {}
    for index, item in enumerate(mails):
        try:
            validated.append(producer.validate(item))
        except ValidationError as exc:
            problems.update({f"[{index}].{field}": problem for field, problem in exc.problems.items()})
    if problems:
        raise ValidationError(problems)
    ids: list[str] = []
    for start in range(0, len(validated), BATCH):
        for done in producer.enqueue_valid(validated[start : start + BATCH]):
            if isinstance(done, IdempotencyConflict):
                raise done
            ids.append(done.id)
    return ids
