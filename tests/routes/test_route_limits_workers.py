"""Provider limits and failover end to end: worker pools as processes, real SMTP sinks, the private Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis
from helpers import free_port, wait_until
from route_support import Workers, busiest_window, mails, per_second, route_url
from servers import RecordingSmtpServer, Rule

from dispatcher.dev.devsink import DevSink
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore
from dispatcher.routes.breaker import Breaker
from dispatcher.routes.config import RoutePolicy
from dispatcher.routes.throttle import Throttle

Sink = Callable[..., RecordingSmtpServer]
Start = Callable[..., Workers]


def _states(client: redis.Redis, ids: list[str]) -> list[str | None]:
    store = SendStore(client)
    return [rec.state if (rec := store.load(i)) else None for i in ids]


def _all_delivered(client: redis.Redis, ids: list[str], workers: Workers, timeout: float) -> None:
    wait_until(
        lambda: _states(client, ids).count("delivered") == len(ids),
        timeout=timeout,
        interval=0.1,
        message=f"not all delivered: {sorted(set(_states(client, ids)))}\n{workers.tail()}",
    )


def _enqueue(client: redis.Redis, batch: list[dict[str, Any]]) -> list[str]:
    return [done.id for done in Producer(client).enqueue_valid([Producer(client).validate(m) for m in batch])]


def test_rate_limit_is_shared_by_four_workers(
    smtp_server: Sink, redis_client: redis.Redis, start_workers: Start
) -> None:
    sink = smtp_server()
    ids = _enqueue(redis_client, mails(300, "rate"))
    env = {"SMTP_URL": route_url(sink.port, rate=20), "DISPATCH_LOG_LEVEL": "debug"}
    workers = start_workers(env, concurrency=4)
    _all_delivered(redis_client, ids, workers, timeout=40)
    arrivals = [m.received_at for m in sink.wait_for_messages(300, 5)]
    assert len(arrivals) == 300
    dues = [event["due_ms"] / 1000 for event in workers.events("route_token")]
    assert len(dues) >= 300, "every send goes out on a token of the route's bucket"
    # The limiter's own schedule (each token's time on Redis's clock): 20 a second, one edge of the window.
    assert busiest_window(dues) <= 21, sorted(per_second(dues).items())
    # At the sink, sending adds its jitter to that schedule (a late mail and an on-time one can share a
    # second on a loaded machine), but no jitter makes the average faster than the limit.
    assert max(arrivals) - min(arrivals) >= (300 - 21) / 20, sorted(per_second(arrivals).items())
    assert len({m.connection_id for m in sink.messages}) >= 2, "the work was not shared by the workers"
    assert not workers.events("mail_throttled"), "a wait of 4/20 s should never defer a send"


def test_connection_cap_holds_across_four_workers(
    smtp_server: Sink, redis_client: redis.Redis, start_workers: Start
) -> None:
    sink = smtp_server()
    ids = _enqueue(redis_client, mails(80, "cap"))
    workers = start_workers({"SMTP_URL": route_url(sink.port, max_connections=2)}, concurrency=4)
    _all_delivered(redis_client, ids, workers, timeout=30)
    assert sink.max_active_connections <= 2, sink.max_active_connections
    assert sink.max_active_connections == 2, "the cap should still let two connections work"
    assert len(sink.wait_for_messages(80, 5)) == 80


def test_421_burst_slows_the_route_then_it_recovers(
    smtp_server: Sink, redis_client: redis.Redis, start_workers: Start
) -> None:
    batch = mails(60, "slow")
    refused = {m["to"][0]: Rule(421, "4.7.0 Too many messages, slow down", times=1) for m in batch[5:9]}
    sink = smtp_server(rules=refused)
    ids = _enqueue(redis_client, batch)
    workers = start_workers({"SMTP_URL": route_url(sink.port, rate=40, slowdown_step=1)}, concurrency=4)
    _all_delivered(redis_client, ids, workers, timeout=30)
    slowed = workers.events("route_slowed_down")
    assert slowed and slowed[0]["factor"] == 0.5 and slowed[0]["rate"] == 20 and slowed[0]["code"] == 421
    policy = RoutePolicy("default", rate=40, slowdown_step=1)
    wait_until(
        lambda: Throttle(redis_client).factor(policy) == 1.0, timeout=10, message="rate never recovered"
    )
    _enqueue(redis_client, mails(4, "after"))  # a send after recovery logs the last step
    wait_until(lambda: bool(workers.events("route_rate_recovered")), timeout=15, message=workers.tail())
    received = sink.wait_for_messages(64, 10)
    assert sorted(r for m in received for r in m.rcpt_tos) == sorted(
        [m["to"][0] for m in batch] + [m["to"][0] for m in mails(4, "after")]
    ), "a mail was lost or sent twice"


def test_failover_while_primary_is_down_and_return_after_cooldown(
    smtp_server: Sink, redis_client: redis.Redis, start_workers: Start
) -> None:
    backup = smtp_server()
    port = free_port()  # nothing listens: connection refused
    primary_url = route_url(port, fallback="backup", breaker_failures=2, breaker_cooldown=2)
    env = {"SMTP_URL": primary_url, "SMTP_URL_BACKUP": route_url(backup.port)}
    first = _enqueue(redis_client, mails(20, "down"))
    workers = start_workers(env, concurrency=2)
    _all_delivered(redis_client, first, workers, timeout=30)
    assert len(backup.wait_for_messages(20, 5)) == 20
    assert workers.events("route_breaker_opened")
    primary = DevSink(port=port)
    primary.start()
    try:
        policies = {"default": RoutePolicy("default", breaker_cooldown=2)}
        wait_until(
            lambda: Breaker(redis_client, policies, "test").state("default") == "half-open", timeout=10
        )
        second = _enqueue(redis_client, mails(20, "back"))
        _all_delivered(redis_client, second, workers, timeout=30)
        assert len(primary.messages) == 20, "traffic did not return to the primary"
        assert len(backup.messages) == 20
        assert Breaker(redis_client, policies, "test").state("default") == "closed"
    finally:
        primary.stop()
