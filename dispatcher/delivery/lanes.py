"""One job's sends to a route over the process's K connections to it (``worker.py --connections K``).

Why threads, not one thread multiplexing K sockets with ``selectors``: the sans-IO ``Transaction`` could
be driven that way, but everything around it blocks — ``Connection`` (TCP and TLS, a deadline per wait),
``Channel``, ``MessageStream`` and the client's lifecycle (connect, STARTTLS, AUTH, NOOP probe, free
reconnect, caps). A selector loop means a second, non-blocking copy of all of it, TLS want-read/want-write
included, and a second copy of every guarantee to prove. A *lane* is one thread owning one ``SmtpClient``
of the route and driving it exactly as a one-connection batch does: the same stream, the same gate calls,
the same records. A worker waits on the network, and the GIL is free while it does (bench/connections.py
measures the process against as many processes).

A worker with K connections also runs up to K jobs at once: it adopts queued jobs before rq starts one
(``worker.adoption``), and their sends join the batch, so K connections each stream a job's worth.

Sharing the batch: lanes take the batch's next send from one ``Feed`` under a lock — it is prepared there
(the begin script, the MIME), one at a time — and the feed ends at the first send for another route,
which the batch then goes on with as before. Each lane has its own deadlines and transcript (its client's),
log context (structlog's contextvars are per thread) and records (``Attempt.complete``); the redis-py
client is shared (thread-safe), a pipeline never is. One lane runs in the job's own thread, as before.

Invariants:
- **A send a lane took is recorded once, by that lane** — its outcome, a throttle or an interruption; one
  it took but never put on the wire stays in the batch, which hands it back like any send not reached.
- **No data goes out without its marker first, and none after an interruption**: a lane checks the
  interruption and writes the data-out marker (``Attempt.data_going_out``) under one lock, the lock the
  interruption is set under; once set, a lane about to write data raises ``DataWithheld`` instead.
- **An interruption (job timeout, cold shutdown) arrives in the job's thread**, which only supervises:
  it sets the interruption, breaks every lane's connection (``SmtpClient.interrupt``) until each lane has
  ended, and raises it on. Each lane records what it had on the wire as interrupted — *unknown* once that
  message's marker was written (its data may have gone out), transient before; never resent blindly. A
  lane that has not ended within the lease (Redis away) leaves its sends to recovery: the job does not
  hand them back, their leases expire, and the marker decides (``queue.recovery.requeue``).
- **Route caps**: a route with ``max_connections`` gets at most that many lanes, each client holding its own
  slot (``routes.slots``) and sending one message at a time through the gate, as such a route's single
  connection does. A route with fallbacks (breakers) is never laned: failover is decided per send.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import structlog

from dispatcher.delivery.attempt import Attempt
from dispatcher.errors import DataWithheld, SmtpError, UnknownOutcome
from dispatcher.routes.gate import RouteGate
from dispatcher.smtp.outcomes import SendResult
from dispatcher.smtp.session import SmtpClient
from dispatcher.smtp.stages import Stage
from dispatcher.smtp.stream import Outgoing
from dispatcher.worker.runtime import Runtime

logger = structlog.get_logger("dispatcher.delivery.lanes")
BREAK_PERIOD = 0.05
"""Seconds between the supervisor's calls breaking the connections of lanes not yet ended."""


class Batch(Protocol):
    """What lanes use of the job's batch (``jobs.Batch``)."""

    runtime: Runtime
    results: dict[str, Any]
    """Each recorded send's summary, by send id."""
    held: Attempt | None
    """The send that ended the feed (another route's), for the batch to go on with."""
    abandoned: set[str]
    """Sends the job must not hand back (a lane still had them when it gave up waiting)."""

    @property
    def gate(self) -> RouteGate: ...

    def next_prepared(self) -> Attempt | None: ...


def lane_count(gate: RouteGate, route: str, connections: int, sends: int) -> int:
    """How many lanes a batch with ``sends`` left may use on ``route``: at most ``connections``, one per
    send, ``max_connections`` on a capped route, and one on a route with fallbacks."""
    policy = gate.policy(route)
    if policy.fallbacks or any(route in p.fallbacks for p in gate.policies.values()):
        return 1
    cap = policy.max_connections if policy.max_connections is not None else connections
    return max(1, min(connections, cap, sends))


class Feed:
    """The batch's prepared sends for one route, handed to lanes one at a time."""

    def __init__(self, batch: Batch, first: Attempt, route: str) -> None:
        self.batch, self.route = batch, route
        self._first: Attempt | None = first
        self._lock = threading.Lock()
        self.finished = False

    def take(self) -> Attempt | None:
        """The next send for the route, prepared; None once there is none (another route's is held)."""
        with self._lock:
            if self._first is not None:
                first, self._first = self._first, None
                return first
            if self.finished:
                return None
            attempt = self.batch.next_prepared()
            if attempt is None or attempt.rec.route != self.route:
                self.batch.held = attempt
                self.finished = True
                return None
            return attempt

    def stop(self) -> None:
        """No lane takes another send (it stays in the batch: handed back). Never waits for the lock."""
        self.finished = True


class Lanes:
    """The lanes of one route in one batch; see the module docstring."""

    def __init__(self, batch: Batch, first: Attempt, route: str, clients: list[SmtpClient], *, streams: bool):
        self.batch, self.route, self.streams = batch, route, streams
        self.feed = Feed(batch, first, route)
        self.lanes = [Lane(self, client) for client in clients]
        self.interruption: BaseException | None = None
        self.marking = threading.Lock()
        """Held while a lane checks the interruption and writes a data-out marker, and while it is set."""

    @property
    def gate(self) -> RouteGate:
        return self.batch.gate

    def run(self) -> None:
        """Drive every lane until the feed ends; raises the interruption, or the first lane's error."""
        if len(self.lanes) == 1:
            self.lanes[0].drive()
            return
        for index, lane in enumerate(self.lanes):
            threading.Thread(target=lane.run, name=f"lane-{index}", daemon=True).start()
        try:
            for lane in self.lanes:
                lane.join()
        except BaseException as exc:  # a job timeout or a cold shutdown, in this thread only
            self.interrupt(exc)
            raise
        errors = [lane.error for lane in self.lanes if lane.error is not None]
        if errors:
            raise errors[0]

    def interrupt(self, exc: BaseException) -> None:
        """Stop every lane: no new send, no more data; break their connections until each has ended."""
        with self.marking:
            self.interruption = exc
        self.feed.stop()
        deadline = time.monotonic() + self.batch.runtime.settings.lease_seconds
        while alive := [lane for lane in self.lanes if lane.alive]:
            if time.monotonic() >= deadline:
                left = {key for lane in alive for key in lane.taken}
                self.batch.abandoned.update(left)
                logger.error("lanes_left_running", lanes=len(alive), sends=sorted(left))
                return
            for lane in alive:
                lane.client.interrupt()
            alive[0].join(BREAK_PERIOD)
        logger.warning("lanes_interrupted", lanes=len(self.lanes), reason=type(exc).__name__)


class Lane:
    """One connection of a batch's route, driven in its own thread (or the job's, when it is the only one)."""

    def __init__(self, lanes: Lanes, client: SmtpClient) -> None:
        self.lanes, self.client = lanes, client
        self.prepared: dict[str, Attempt] = {}
        """Given to the client, waiting for their outcome."""
        self.first: Attempt | None = None
        """Taken from the feed ahead (``_may_follow``), not yet given to the client."""
        self.admitted = False
        self.done = False
        self.marked: set[str] = set()
        """Sends whose data-out marker this lane wrote."""
        self.taken: set[str] = set()
        self.error: BaseException | None = None
        self.ended = threading.Event()
        """Set when the lane's thread has ended. Waited on instead of ``Thread.join``: a join interrupted by
        a signal handler's exception marks a thread still running as stopped (Python 3.11)."""

    @property
    def alive(self) -> bool:
        return not self.ended.is_set()

    def join(self, timeout: float | None = None) -> None:
        self.ended.wait(timeout)

    def run(self) -> None:
        """A lane thread's body: an error stops the feed (the other lanes finish what they have)."""
        try:
            self.drive()
        except BaseException as exc:
            self.error = exc
            self.lanes.feed.stop()
            logger.warning("lane_failed", error=f"{type(exc).__name__}: {exc}", conn_id=self.client.conn_id)
        finally:
            structlog.contextvars.clear_contextvars()
            self.ended.set()

    def drive(self) -> None:
        if self.lanes.streams:
            self._stream()
        else:
            self._one_by_one()

    # -- where sends come from ---------------------------------------------------------------------

    def _next(self) -> Attempt | None:
        if self.first is not None:
            first, self.first = self.first, None
            return first
        if self.done or self.lanes.interruption is not None:
            self.done = True
            return None
        attempt = self.lanes.feed.take()
        if attempt is None:
            self.done = True
        else:
            self.taken.add(attempt.send_id)
        return attempt

    def _admitted(self, attempt: Attempt) -> bool:
        """Whether the route's limits let ``attempt`` go (waiting, bounded); recorded as held back if not."""
        refused = None if self.admitted else self.lanes.gate.admit(self.lanes.route, self.client)
        self.admitted = False
        if refused is None:
            return True
        self.lanes.batch.results[attempt.send_id] = attempt.throttled(self.lanes.route, refused)
        return False

    def _source(self) -> Iterator[Outgoing]:
        while (attempt := self._next()) is not None:
            if self._admitted(attempt):
                self.prepared[attempt.send_id] = attempt
                yield attempt.outgoing()

    def _may_follow(self) -> bool:
        """Asked when a message's data is due: may the next one go with it, its token taken right now?"""
        if self.first is None:
            self.first = self._next()
        if self.first is None:
            return False
        if not self.admitted:
            self.admitted = self.lanes.gate.admit_now(self.lanes.route)
        return self.admitted

    def _before_data(self, message: Outgoing) -> None:
        with self.lanes.marking:
            if self.lanes.interruption is not None:
                raise DataWithheld("the job was interrupted before this message's data", stage=Stage.DATA)
            self.prepared[message.key].data_going_out()
            self.marked.add(message.key)

    # -- the two drivers ---------------------------------------------------------------------------

    def _stream(self) -> None:
        """Back to back on the lane's connection, one round trip per message (``SmtpClient.send_stream``)."""
        client = self.client
        try:
            while self.lanes.interruption is None:
                if self.first is None and not self.done:
                    self.first = self._next()  # before the stream: a lane with nothing to send connects not
                if self.first is None and not self.prepared:
                    return
                progressed = False
                for message, outcome in client.send_stream(self._source(), self._may_follow,
                                                           before_data=self._before_data):  # fmt: skip
                    self._record(message.key, outcome)
                    progressed = True
                if not progressed and self.done and self.prepared:
                    raise RuntimeError(f"stream gave no outcome for {sorted(self.prepared)}")  # handed back
        except BaseException as exc:
            # Interrupted mid-dialogue: what was on the wire is recorded, the rest is handed back.
            for message, data_written in client.stream_in_flight():
                self._interrupted(message.key, data_written, exc)
            client.abort()
            raise

    def _one_by_one(self) -> None:
        """One message at a time through the gate (a capped route: its slot is taken, used and shared)."""
        client, gate = self.client, self.lanes.gate
        while (attempt := self._next()) is not None:
            if not self._admitted(attempt):
                continue
            message = attempt.outgoing()
            self.prepared[message.key] = attempt

            def before_data(message: Outgoing = message) -> None:
                self._before_data(message)

            outcome: SendResult | SmtpError
            try:
                with gate.using(client):
                    try:
                        outcome = client.send(
                            message.sender, message.recipients, message.data, before_data=before_data
                        )
                    except SmtpError as exc:
                        outcome = exc
            except BaseException as exc:
                in_flight = client.data_in_flight
                client.abort()
                self._interrupted(message.key, in_flight, exc)
                raise
            self._record(message.key, outcome)

    # -- records -----------------------------------------------------------------------------------

    def _record(self, key: str, outcome: SendResult | SmtpError) -> None:
        cause = self.lanes.interruption
        if cause is not None and isinstance(outcome, SmtpError):  # the break was ours
            self._interrupted(key, isinstance(outcome, UnknownOutcome), cause)
            return
        attempt = self.prepared.pop(key)
        client, gate, route = self.client, self.lanes.gate, self.lanes.route
        if isinstance(outcome, SendResult):
            gate.answered(route, client)
        else:
            gate.failed(route, client, outcome)
        self.lanes.batch.results[key] = attempt.complete(outcome, client.conn_id, client.transcript_of(key))

    def _interrupted(self, key: str, data_written: bool, exc: BaseException) -> None:
        """Record a send cut off mid-dialogue: unknown once its data may be out (its marker written)."""
        attempt = self.prepared.pop(key, None)
        if attempt is None:
            return
        attempt.bind()
        cause = self.lanes.interruption or exc
        written = data_written or key in self.marked
        self.lanes.batch.results[key] = attempt.interrupted(written, self.client.conn_id, cause)
