"""What ``Attempt._send`` asks before and after a send: which route, may it go now, what the reply means.

One ``RouteGate`` per worker process ties the route policies (``routes``), the shared limits (``throttle``,
``slots``) and the breakers (``breaker``) together so the job code stays a few lines:

    for route in gate.candidates(rec.route):        # primary unless its breaker is open, then fallbacks
        client = runtime.client(route, redis)
        if (why := gate.admit(route, client)) ...   # connection slot + rate token, waited for in the job;
                                                    # a longer wait defers the send without an attempt
        with gate.using(client): client.send(...)
        gate.failed(route, client, exc) / gate.answered(route, client)

Both read every refusal the client consumed (``SmtpClient.take_replies``) — a 421 it recovered from by
reconnecting included — so the adaptive slow-down works on every path: lock-step, streamed, slotted and
failover routes alike.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import ClassVar

import redis
import structlog

from dispatcher.errors import SmtpError
from dispatcher.queue.store import OUTAGE
from dispatcher.routes.breaker import Breaker, is_connection_failure
from dispatcher.routes.config import RoutePolicy
from dispatcher.routes.throttle import Reservation, Throttle, is_slow_down
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.session import SmtpClient

logger = structlog.get_logger("dispatcher.routes.gate")
RESUME_SPREAD = 30.0
"""Seconds over which the sends a cap held back resume after its window ends (no thundering herd)."""


@dataclass(frozen=True, slots=True)
class RoutePause:
    """The route holds a send back: nothing was spent. ``until`` (epoch seconds) is when trying again is
    worth it — ``None``: soon, by the retry backoff — and resumptions spread over ``spread`` seconds.
    A daily cap pauses its route until the cap's window ends; a provider's quota reply will too."""

    reason: str
    until: float | None = None
    spread: float = 0.0


class RouteGate:
    """Per-process access to the routes' shared limits and breakers."""

    _instances: ClassVar[dict[int, RouteGate]] = {}

    def __init__(self, connection: redis.Redis, policies: Mapping[str, RoutePolicy], max_wait: float) -> None:
        self.policies = policies
        self.max_wait = max_wait
        self.throttle = Throttle(connection)
        self.breaker = Breaker(connection, policies, f"{socket.gethostname()}-{os.getpid()}")

    @classmethod
    def for_process(
        cls, connection: redis.Redis, policies: Mapping[str, RoutePolicy], max_wait: float
    ) -> RouteGate:
        """The gate of this Redis connection (one per process in a worker); ``max_wait`` caps every
        route's own ``max_wait`` so a wait always ends well inside the job's timeout."""
        gate = cls._instances.get(id(connection))
        if gate is None:
            gate = cls._instances[id(connection)] = cls(connection, policies, max_wait)
        return gate

    def policy(self, route: str) -> RoutePolicy:
        return self.policies.get(route) or RoutePolicy(route)

    def candidates(self, route: str) -> Iterator[str]:
        """``route`` unless its breaker is open, then its fallbacks; just ``route`` while the breakers
        cannot be read (Redis away)."""
        given = False
        try:
            for candidate in self.breaker.candidates(route):
                given = True
                yield candidate
        except OUTAGE as exc:
            logger.warning("route_breaker_unreadable", route=route, error=str(exc))
            if not given:
                yield route

    def admit(self, route: str, client: SmtpClient) -> RoutePause | None:
        """Wait (in this job, bounded) for a connection slot and a token of ``route``. None when the send
        may go; otherwise the pause that holds it back — nothing was spent, the caller defers it without
        an attempt until the pause ends."""
        try:
            return self._admit(route, client)
        except OUTAGE as exc:  # the shared limits cannot be read: hold the send back, spend nothing
            logger.warning("route_limits_unreadable", route=route, error=str(exc))
            return RoutePause(f"route {route}: its limits cannot be read (Redis: {exc})")

    def _admit(self, route: str, client: SmtpClient) -> RoutePause | None:
        policy = self.policy(route)
        max_wait = min(policy.max_wait, self.max_wait)
        if client.permit is not None and not client.permit.take(max_wait):
            busy = f"all {policy.max_connections} connection slots stayed busy"
            return RoutePause(f"route {route}: {busy} for {max_wait:g}s")
        reservation = self.throttle.acquire(policy, max_wait)
        if reservation.granted:
            _note_token(route, reservation)
            return None
        if reservation.reason == "daily":
            until = time.time() + reservation.wait
            logger.info("route_daily_cap_reached", route=route, daily=policy.daily, resumes_at=until)
            resumes = datetime.fromtimestamp(until, UTC).strftime("%H:%M:%S")
            spread = min(RESUME_SPREAD, policy.daily_period / 20)
            return RoutePause(
                f"route {route}: daily cap of {policy.daily} reached; resumes at {resumes} UTC", until, spread
            )
        # A rate backlog longer than max_wait: retry by backoff, spread wide (a single ``until`` for every
        # send the bucket refused would bring them all back at once).
        wait = f"next token in {reservation.wait:.1f}s (over {max_wait:g}s)"
        return RoutePause(f"route {route}: rate limit, {wait}")

    def admit_now(self, route: str) -> bool:
        """Take ``route``'s next token only if it is there now (never waits, never defers); False while
        the limits cannot be read."""
        try:
            reservation = self.throttle.reserve(self.policy(route), 0)
        except OUTAGE as exc:
            logger.warning("route_limits_unreadable", route=route, error=str(exc))
            return False
        _note_token(route, reservation)
        return reservation.granted

    @staticmethod
    def using(client: SmtpClient) -> contextlib.AbstractContextManager[object]:
        """Hold the client against the slot keeper thread while a job uses it."""
        return client.permit.in_use() if client.permit is not None else contextlib.nullcontext()

    def failed(self, route: str, client: SmtpClient, exc: SmtpError) -> bool:
        """Report an error of a send on ``route``; True when the send should move to the next candidate
        (a connection-level failure — before MAIL FROM, so nothing was offered — with the breaker open).
        Bookkeeping only: while Redis is away it is skipped (logged), never the send's error."""
        try:
            return self._failed(route, client, exc)
        except OUTAGE as error:
            logger.warning("route_bookkeeping_skipped", route=route, error=str(error))
            return False

    def _failed(self, route: str, client: SmtpClient, exc: SmtpError) -> bool:
        self._adapt(route, [*client.take_replies(), exc.reply])
        if not self._guarded(route):
            return False
        if not is_connection_failure(exc):
            self.breaker.success(route)  # the server talked to us: the route is reachable
            return False
        return self.breaker.failure(route, exc) or self.breaker.is_open(route)

    def answered(self, route: str, client: SmtpClient) -> None:
        """The send on ``route`` got its replies: close the breaker, adapt the rate to every refusal the
        client read for it, share the slot (skipped, logged, while Redis is away: the outcome stands)."""
        try:
            self._answered(route, client)
        except OUTAGE as exc:
            logger.warning("route_bookkeeping_skipped", route=route, error=str(exc))

    def _answered(self, route: str, client: SmtpClient) -> None:
        if self._guarded(route):
            self.breaker.success(route)
        self._adapt(route, client.take_replies())
        if client.permit is not None:
            client.permit.share()

    def streamable(self, route: str) -> bool:
        """No connection slot or breaker to consult around each send, so sends may stream back to back
        (a rate or daily limit is asked per message, as each one is about to go on the wire)."""
        return self.policy(route).max_connections is None and not self._guarded(route)

    def describe(self, route: str) -> dict[str, object]:
        """The route's limits and their live state, for the dashboard (reads only; nothing for a plain
        route)."""
        policy = self.policy(route)
        state: dict[str, object] = {}
        if policy.limited:
            state.update(rate=policy.rate, daily=policy.daily, sent_today=self.throttle.sent_today(policy))
            if policy.rate is not None:
                state["rate_factor"] = round(self.throttle.factor(policy), 3)
        if policy.max_connections is not None:
            state["max_connections"] = policy.max_connections
        if self._guarded(route):
            state.update(fallbacks=list(policy.fallbacks), breaker=self.breaker.state(route))
        return state

    def _guarded(self, route: str) -> bool:
        """Breakers exist to fail over: a route without fallbacks (nor one serving as a fallback) has none."""
        return bool(self.policy(route).fallbacks) or any(route in p.fallbacks for p in self.policies.values())

    def _adapt(self, route: str, replies: Iterable[Reply | None]) -> None:
        policy = self.policy(route)
        if policy.rate is None:
            return
        for reply in replies:
            if reply is not None and is_slow_down(reply.code, reply.enhanced):
                self.throttle.slow_down(policy, code=reply.code, enhanced=reply.enhanced)
                return


def _note_token(route: str, reservation: Reservation) -> None:
    """DEBUG ``route_token``: a rate token granted, with its due time on Redis's clock — the limiter's own
    schedule, which a test can hold to the rate without the jitter of sending."""
    if reservation.granted and reservation.due_ms is not None:
        logger.debug("route_token", route=route, due_ms=reservation.due_ms)
