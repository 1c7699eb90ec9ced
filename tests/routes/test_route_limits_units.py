"""The shared limits against the real Redis: token bucket (atomic under threads), reservations, daily cap,
slow-down and recovery, connection-slot leases, the breaker, and the route options."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import redis
from helpers import wait_until

from dispatcher.errors import ConfigurationError, ConnectError, ReplyError, ServiceClosing
from dispatcher.routes.breaker import Breaker, is_connection_failure
from dispatcher.routes.config import RoutePolicy, parse_policy, split_route_url
from dispatcher.routes.slots import ConnectionSlots
from dispatcher.routes.throttle import Throttle, is_slow_down
from dispatcher.settings import load_settings
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.stages import Stage


def test_bucket_never_grants_more_than_it_holds_under_threads(redis_client: redis.Redis) -> None:
    policy = RoutePolicy("t", rate=0.001, burst=20)  # refills one token in 1000 s: only the 20 held
    granted: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(10)

    def grab() -> None:
        throttle = Throttle(redis.Redis(connection_pool=redis_client.connection_pool))
        start.wait()
        for _ in range(10):
            result = throttle.reserve(policy, max_wait=0).granted
            with lock:
                granted.append(result)

    threads = [threading.Thread(target=grab) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(granted) == 100
    assert sum(granted) == 20


def test_reservations_queue_up_one_interval_apart(redis_client: redis.Redis) -> None:
    throttle = Throttle(redis_client)
    policy = RoutePolicy("q", rate=10, burst=1)
    waits = [throttle.reserve(policy, max_wait=5).wait for _ in range(5)]
    assert waits[0] == pytest.approx(0, abs=0.02)
    for earlier, later in itertools.pairwise(waits):
        assert later - earlier == pytest.approx(0.1, abs=0.02)
    refused = throttle.reserve(policy, max_wait=0.2)  # the next token is ~0.5 s away
    assert not refused.granted and refused.wait > 0.4
    assert throttle.reserve(policy, max_wait=5).wait == pytest.approx(0.5, abs=0.03), "a refusal took a token"


def test_acquire_sleeps_until_its_token(redis_client: redis.Redis) -> None:
    throttle = Throttle(redis_client)
    policy = RoutePolicy("s", rate=20, burst=1)
    started = time.monotonic()
    for _ in range(6):
        assert throttle.acquire(policy).granted
    assert time.monotonic() - started >= 5 / 20 - 0.02


def test_daily_cap_counts_and_stops(redis_client: redis.Redis) -> None:
    throttle = Throttle(redis_client)
    policy = RoutePolicy("d", daily=3)
    assert [throttle.reserve(policy).granted for _ in range(3)] == [True, True, True]
    capped = throttle.reserve(policy)
    assert (capped.granted, capped.reason) == (False, "daily")
    assert 0 < capped.wait <= 86400
    assert throttle.sent_today(policy) == 3


def test_slow_down_halves_then_recovers_step_by_step(redis_client: redis.Redis) -> None:
    throttle = Throttle(redis_client)
    policy = RoutePolicy("a", rate=100, slowdown_step=0.4)
    assert throttle.slow_down(policy, code=421, enhanced="4.7.0") == 0.5
    assert throttle.slow_down(policy, code=421, enhanced="4.7.0") is None, "one burst, one cut"
    assert throttle.factor(policy) == 0.5
    wait_until(lambda: throttle.factor(policy) == 0.75, timeout=2, message="no first recovery step")
    wait_until(lambda: throttle.factor(policy) == 1.0, timeout=2, message="never back to full rate")
    assert throttle.reserve(policy).factor == 1.0
    assert redis_client.hget("dispatch:route:a:bucket", "factor") is None


def test_slowed_rate_spaces_tokens_wider(redis_client: redis.Redis) -> None:
    throttle = Throttle(redis_client)
    policy = RoutePolicy("w", rate=10, slowdown_step=60)
    throttle.slow_down(policy, code=451, enhanced="4.7.1")
    waits = [throttle.reserve(policy, max_wait=5).wait for _ in range(3)]
    assert waits[2] - waits[1] == pytest.approx(0.2, abs=0.02)  # 5/s instead of 10/s


def test_slow_down_replies() -> None:
    assert is_slow_down(421, None) and is_slow_down(451, "4.7.1") and is_slow_down(450, "4.7.0")
    assert not is_slow_down(450, "4.2.0") and not is_slow_down(550, "5.7.1") and not is_slow_down(None, None)


def test_slot_lease_of_a_dead_holder_expires(redis_client: redis.Redis) -> None:
    slots = ConnectionSlots(redis_client, RoutePolicy("c", max_connections=1), lease_seconds=0.5)
    assert slots.try_acquire("dead-worker")
    assert not slots.try_acquire("other")
    started = time.monotonic()
    wait_until(lambda: slots.try_acquire("other"), timeout=3, message="the dead holder's lease never expired")
    assert time.monotonic() - started >= 0.3
    assert slots.in_use() == 1


def test_release_wakes_a_blocked_waiter(redis_client: redis.Redis) -> None:
    slots = ConnectionSlots(redis_client, RoutePolicy("r", max_connections=2), lease_seconds=30)
    assert slots.try_acquire("a") and slots.try_acquire("b") and not slots.try_acquire("c")
    got: list[float] = []

    def wait_for_slot() -> None:
        waiter = ConnectionSlots(redis.Redis(connection_pool=redis_client.connection_pool), slots.policy)
        if waiter.acquire("c", max_wait=10):
            got.append(time.monotonic())

    thread = threading.Thread(target=wait_for_slot)
    thread.start()
    wait_until(lambda: slots.waiters() == 1, timeout=5, message="the waiter never registered")
    released = time.monotonic()
    slots.release("a")
    thread.join(timeout=10)
    assert got and got[0] - released < 0.5
    assert slots.waiters() == 0 and slots.in_use() == 2


def test_breaker_opens_half_opens_and_closes(redis_client: redis.Redis) -> None:
    policies = {"p": RoutePolicy("p", fallbacks=("b",), breaker_failures=2, breaker_cooldown=0.5),
                "b": RoutePolicy("b")}  # fmt: skip
    breaker = Breaker(redis_client, policies, "me")
    other = Breaker(redis_client, policies, "other")
    refused = ConnectError("connection refused", stage=Stage.CONNECT)
    assert list(breaker.candidates("p")) == ["p", "b"]
    assert not breaker.failure("p", refused)
    assert breaker.failure("p", refused)
    assert breaker.state("p") == "open" and list(breaker.candidates("p")) == ["b"]
    wait_until(lambda: breaker.state("p") == "half-open", timeout=3)
    assert next(breaker.candidates("p")) == "p", "the probe should try the primary"
    assert list(other.candidates("p")) == ["b"], "only one probe at a time"
    breaker.success("p")
    assert breaker.state("p") == "closed" and list(other.candidates("p")) == ["p", "b"]


def test_connection_level_failures_only() -> None:
    greeting = ServiceClosing("closing", stage=Stage.GREETING, reply=Reply(421, ("4.7.0 busy",)))
    rcpt = ServiceClosing("closing", stage=Stage.RCPT, reply=Reply(421, ("4.7.0 busy",)))
    hard = ReplyError("no", stage=Stage.MAIL, reply=Reply(550, ("5.7.1 denied",)))
    assert is_connection_failure(ConnectError("refused", stage=Stage.CONNECT))
    assert is_connection_failure(greeting)
    assert not is_connection_failure(rcpt) and not is_connection_failure(hard)


def test_route_options_are_split_from_the_smtp_url() -> None:
    url = "smtp://relay:587?tls=off&rate=14&daily=50000&max_connections=2&fallback=Backup"
    rest, options = split_route_url(url)
    assert rest == "smtp://relay:587?tls=off"
    policy = parse_policy("default", options)
    assert (policy.rate, policy.daily, policy.max_connections, policy.fallbacks) == (
        14,
        50000,
        2,
        ("backup",),
    )
    settings = load_settings({"SMTP_URL": url, "SMTP_URL_BACKUP": "smtp://backup?rate=1"}, need_routes=True)
    assert settings.routes["default"].host == "relay"
    assert settings.policies["backup"].rate == 1 and settings.policies["default"].fallbacks == ("backup",)
    with pytest.raises(ConfigurationError, match="fallback 'backup' is not configured"):
        load_settings({"SMTP_URL": url}, need_routes=True)
    with pytest.raises(ConfigurationError, match="rate"):
        load_settings({"SMTP_URL": "smtp://relay?rate=fast"})
    with pytest.raises(ConfigurationError, match="unknown"):
        load_settings({"SMTP_URL": "smtp://relay?rate=1&rat=2"})


def test_a_fast_route_takes_tokens_in_batches_and_keeps_their_spacing(redis_client: redis.Redis) -> None:
    policy = RoutePolicy("fast", rate=200)
    throttle = Throttle(redis_client)
    assert throttle.batch_size(policy) == 10  # 50 ms of the rate per Redis call
    redis_client.config_resetstat()
    usable = []
    for _ in range(30):
        reservation = throttle.reserve(policy, max_wait=5)
        assert reservation.granted
        usable.append(time.monotonic() + reservation.wait)
    calls = redis_client.info("commandstats")
    assert sum(v["calls"] for k, v in calls.items() if k.startswith("cmdstat_eval")) == 3
    gaps = [b - a for a, b in itertools.pairwise(usable)]
    assert min(gaps) >= 1 / 200 - 0.002, "tokens handed out locally must keep the route's spacing"
    assert usable[-1] - usable[0] >= 29 / 200 - 0.01


def test_a_slow_route_still_asks_redis_for_every_token(redis_client: redis.Redis) -> None:
    assert Throttle(redis_client).batch_size(RoutePolicy("slow", rate=20)) == 1
    assert Throttle(redis_client).batch_size(RoutePolicy("capped", rate=1000, daily=10)) == 1


def test_a_daily_period_windows_the_cap_and_says_when_it_ends() -> None:
    from dispatcher.routes.config import parse_policy
    from dispatcher.routes.throttle import day_key, window_end

    policy = parse_policy("default", {"daily": "10", "daily_period": "3600"})
    assert (policy.daily, policy.daily_period) == (10, 3600)
    assert window_end(3600, now=7200.5) == 10800 and window_end(now=86399.0) == 86400
    assert day_key("r", when=7200.5, period=3600) != day_key("r", when=10800.0, period=3600)
    assert day_key("r", when=0.0).endswith(":day:19700101")
    with pytest.raises(ConfigurationError, match="daily_period"):
        parse_policy("default", {"daily_period": "0"})
