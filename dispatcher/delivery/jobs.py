"""The rq jobs: ``deliver(send_id)`` runs one attempt (``attempt.Attempt``); ``deliver_batch(send_ids)``
runs one attempt for each send enqueued together, in order, under one lease — streamed over one SMTP
connection, one round trip per message, when the route has no limits to consult per message.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any, ClassVar

import redis
import structlog
from rq import get_current_job

from dispatcher.delivery.attempt import Attempt
from dispatcher.errors import QueueUnavailable
from dispatcher.queue.recovery import requeue_unstarted
from dispatcher.queue.store import SendStore
from dispatcher.routes.gate import RouteGate
from dispatcher.smtp.outcomes import SendResult
from dispatcher.smtp.session import SmtpClient
from dispatcher.smtp.stream import Outgoing
from dispatcher.worker.runtime import Runtime

logger = structlog.get_logger("dispatcher.delivery.jobs")


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
        SendStore(job.connection).lease(send_ids, time.time() + seconds)
    batch = Batch(runtime, job.connection, job.id, send_ids)
    try:
        with LeaseKeeper.for_process(job.connection, seconds).hold(send_ids):
            batch.run()
    finally:
        structlog.contextvars.clear_contextvars()
        rest = [send_id for send_id in send_ids if send_id not in batch.results]
        if rest:
            requeue_unstarted(job.connection, rest, job.id)
    return {"sends": batch.results}


class Batch:
    """The attempts of one job, in order. Consecutive sends on a route without connection slots or a
    breaker stream over the kept connection, one round trip each, each admitted by the route's rate and
    daily limits as it is about to go out; the others go one by one through the route gate. A warm
    shutdown stops before the next send; the job hands the rest back."""

    def __init__(self, runtime: Runtime, connection: redis.Redis, job_id: str, send_ids: list[str]) -> None:
        self.runtime = runtime
        self.redis = connection
        self.job_id = job_id
        self.waiting = deque(send_ids)
        self.results: dict[str, Any] = {}
        self.held: Attempt | None = None

    def run(self) -> None:
        while (attempt := self._next_prepared()) is not None:
            if self._streamable(attempt):
                self._stream(attempt)
            else:
                self.results[attempt.send_id] = attempt.send_prepared()

    def _next_prepared(self) -> Attempt | None:
        """The next attempt with something to send; the others are recorded on the way."""
        if self.held is not None:
            attempt, self.held = self.held, None
            return attempt
        while self.waiting:
            if self.results and self.runtime.stop_requested():
                return None
            send_id = self.waiting.popleft()
            attempt = Attempt(self.runtime, self.redis, self.job_id, send_id)
            done = attempt.prepare()
            if done is None:
                return attempt
            self.results[send_id] = done
        return None

    @property
    def gate(self) -> RouteGate:
        return self.runtime.gate(self.redis)

    def _streamable(self, attempt: Attempt) -> bool:
        route = attempt.rec.route
        return route in self.runtime.settings.routes and self.gate.streamable(route)

    def _stream(self, first: Attempt) -> None:
        route = first.rec.route
        client = self.runtime.client(route)
        prepared = {first.send_id: first}
        source = _StreamSource(self, first, route, prepared, client)
        try:
            while not source.finished or prepared:
                progressed = False
                stream = client.send_stream(
                    iter(source), source.may_follow, before_data=lambda m: prepared[m.key].data_going_out()
                )
                for message, outcome in stream:
                    attempt = prepared.pop(message.key)
                    if isinstance(outcome, SendResult):
                        self.gate.answered(route, client)
                    else:
                        self.gate.failed(route, client, outcome)
                    self.results[message.key] = attempt.complete(
                        outcome, client.conn_id, client.last_transcript
                    )
                    progressed = True
                if not progressed and source.finished and prepared:
                    raise RuntimeError(f"stream gave no outcome for {sorted(prepared)}")  # handed back
        except BaseException as exc:
            # A job timeout or a cold shutdown mid-dialogue: what was on the wire is recorded, the rest of
            # the prepared sends is handed back by the job (they are still "sending" under this job).
            for message, data_written in client.stream_in_flight():
                if message.key in prepared:
                    attempt = prepared.pop(message.key)
                    self.results[message.key] = attempt.interrupted(data_written, client.conn_id, exc)
            client.abort()
            raise


class _StreamSource:
    """Feeds a stream the batch's next prepared sends while they stay on the stream's route, each one
    admitted by the route's limits right before it goes on the wire."""

    def __init__(
        self, batch: Batch, first: Attempt, route: str, prepared: dict[str, Attempt], client: SmtpClient
    ) -> None:
        self.batch, self.route, self.prepared, self.client = batch, route, prepared, client
        self.first: Attempt | None = first
        self.admitted = False
        self.finished = False

    def __iter__(self) -> Iterator[Outgoing]:
        while not self.finished or self.first is not None:
            attempt = self._next()
            if attempt is None:
                return
            refused = None if self.admitted else self.batch.gate.admit(self.route, self.client)
            self.admitted = False
            if refused is not None:
                self.batch.results[attempt.send_id] = attempt.throttled(self.route, refused)
                continue
            self.prepared[attempt.send_id] = attempt
            yield attempt.outgoing()

    def may_follow(self) -> bool:
        """Asked when a message's data is due: may the next one go with it, its token taken right now?"""
        if self.first is None:
            self.first = self._next()
        if self.first is None:
            return False
        if not self.admitted:
            self.admitted = self.batch.gate.admit_now(self.route)
        return self.admitted

    def _next(self) -> Attempt | None:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        if self.finished:
            return None
        attempt = self.batch._next_prepared()
        if attempt is None or attempt.rec.route != self.route or not self.batch._streamable(attempt):
            self.batch.held = attempt
            self.finished = True
            return None
        return attempt


class LeaseKeeper:
    """Keeps the in-flight lease of the send being delivered fresh; a killed worker stops refreshing it.

    One daemon thread per process (not one per job: starting and joining a thread per message costs more
    than the rest of the job's bookkeeping). ``_begin`` sets the first lease; this only extends it.
    """

    _instance: ClassVar[LeaseKeeper | None] = None

    def __init__(self, connection: redis.Redis, seconds: float) -> None:
        self._store, self._seconds = SendStore(connection), seconds
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
                self._store.lease(send_ids, expiry, refresh=True)
            except (redis.RedisError, QueueUnavailable) as exc:
                logger.warning("lease_refresh_failed", sends=len(send_ids), error=str(exc))
