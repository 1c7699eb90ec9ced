"""The rq jobs: ``deliver(send_id)`` runs one attempt (``attempt.Attempt``); ``deliver_batch(send_ids)``
runs one attempt for each send enqueued together, in order, under one lease — streamed over the
process's connections to the route (``lanes``), one round trip per message on each, when the route has no
connection slots or breaker to consult per message.
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
from dispatcher.delivery.lanes import Lanes, lane_count
from dispatcher.errors import QueueUnavailable
from dispatcher.queue.recovery import requeue_unstarted
from dispatcher.queue.store import SendStore
from dispatcher.routes.gate import RouteGate
from dispatcher.worker.runtime import Runtime

logger = structlog.get_logger("dispatcher.delivery.jobs")


def deliver(send_id: str) -> dict[str, Any]:
    """rq entry point for one send (referenced by name in its job)."""
    return deliver_batch([send_id])["sends"][send_id]  # type: ignore[no-any-return]


def deliver_batch(send_ids: list[str]) -> dict[str, Any]:
    """rq entry point for sends enqueued together: one attempt each, in order, on the kept connection.

    Every send of the batch is leased at once, so if the worker dies the reaper requeues the ones it did
    not finish. On a warm shutdown the batch stops after the current send and requeues the rest. When
    Redis goes away under it (a send cannot even be read), it stops there too: the sends it did not reach
    are handed back if Redis answers again in time, or found by recovery when their leases expire — the
    job itself ends normally, nothing of it is an error of the mail. The sends of jobs its worker adopted
    for it (``worker.adoption``, already leased) follow its own, each handed back from its own job.
    """
    job = get_current_job()
    if job is None:
        raise RuntimeError("deliver_batch() must run inside an rq job")
    runtime = Runtime.current()
    seconds = runtime.settings.lease_seconds
    if len(send_ids) > 1:  # a lone send is leased by its attempt's first transaction
        SendStore(job.connection).lease(send_ids, time.time() + seconds)
    adopted = runtime.adopted.get(job.id, [])
    sends = [(j, s) for j, ids in [(job.id, send_ids), *adopted] for s in ids]
    batch = Batch(runtime, job.connection, sends)
    try:
        with LeaseKeeper.for_process(job.connection, seconds).hold([s for _, s in sends]):
            batch.run()
    except QueueUnavailable as exc:
        logger.warning("batch_stopped_redis_unavailable", job_id=job.id, done=len(batch.results),
                       error=str(exc))  # fmt: skip
    finally:
        structlog.contextvars.clear_contextvars()
        rest: dict[str, list[str]] = {}
        for job_id, send_id in sends:
            if send_id not in batch.results and send_id not in batch.abandoned:
                rest.setdefault(job_id, []).append(send_id)
        for job_id, ids in rest.items():
            requeue_unstarted(job.connection, ids, job_id)
    own = {s: batch.results[s] for s in send_ids if s in batch.results}
    return {"sends": own, "adopted": {j: {s: batch.results.get(s) for s in ids} for j, ids in adopted}}


class Batch:
    """The attempts of one job, in order. Consecutive sends of a route go over the process's connections
    to it (``lanes``: up to ``--connections``, one by default) — streamed back to back, one round trip
    each, on a route without connection slots or a breaker, each admitted by the route's rate and daily
    limits as it is about to go out; one at a time per connection, each through the gate, on a capped
    route. The others go one by one through the route gate. A warm shutdown stops before the next send;
    the job hands the rest back (not those left to recovery: ``abandoned``)."""

    def __init__(self, runtime: Runtime, connection: redis.Redis, sends: list[tuple[str, str]]) -> None:
        self.runtime = runtime
        self.redis = connection
        self.waiting = deque(dict.fromkeys(sends))
        """``(job id, send id)``: the job each send's record names (its own, or one adopted for it). Each
        pair once: a send named twice (a job queued twice) would be taken by two lanes at once."""
        self.results: dict[str, Any] = {}
        self.held: Attempt | None = None
        self.abandoned: set[str] = set()
        """Sends of lanes that did not end when interrupted: their leases and markers decide (recovery)."""

    def run(self) -> None:
        while (attempt := self.next_prepared()) is not None:
            lanes = self._lanes(attempt)
            if lanes is not None:
                lanes.run()
            else:
                self.results[attempt.send_id] = attempt.send_prepared()

    def next_prepared(self) -> Attempt | None:
        """The next attempt with something to send; the others are recorded on the way."""
        if self.held is not None:
            attempt, self.held = self.held, None
            return attempt
        while self.waiting:
            if self.results and self.runtime.stop_requested():
                return None
            job_id, send_id = self.waiting.popleft()
            attempt = Attempt(self.runtime, self.redis, job_id, send_id)
            done = attempt.prepare()
            if done is None:
                return attempt
            self.results[send_id] = done
        return None

    @property
    def gate(self) -> RouteGate:
        return self.runtime.gate(self.redis)

    def _lanes(self, first: Attempt) -> Lanes | None:
        """The lanes for ``first`` and the sends after it on its route; None when it goes alone through
        the gate (an unknown route, a route with fallbacks, a capped route on one connection)."""
        route = first.rec.route
        if route not in self.runtime.settings.routes:
            return None
        streams = self.gate.streamable(route)
        count = lane_count(self.gate, route, self.runtime.connections, len(self.waiting) + 1)
        if not streams and count == 1:
            return None
        clients = self.runtime.lane_clients(route, count, None if streams else self.redis)
        return Lanes(self, first, route, clients, streams=streams)


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
