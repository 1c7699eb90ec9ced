"""What workers publish about a route's limits, and how the overview words it."""

from __future__ import annotations

import redis

from dispatcher.dashboard.stats import describe_route
from dispatcher.routes.config import RoutePolicy
from dispatcher.routes.gate import RouteGate


def test_gate_describes_live_limit_state_and_nothing_for_a_plain_route(redis_client: redis.Redis) -> None:
    policies = {
        "default": RoutePolicy("default", rate=20, daily=1000, max_connections=2, fallbacks=("backup",)),
        "backup": RoutePolicy("backup"),
        "plain": RoutePolicy("plain"),
    }
    gate = RouteGate(redis_client, policies, max_wait=5)
    assert gate.describe("plain") == {}
    assert gate.throttle.reserve(policies["default"], max_wait=5).granted
    gate.throttle.slow_down(policies["default"], code=421, enhanced="4.7.0")
    state = gate.describe("default")
    assert state["rate"] == 20 and state["rate_factor"] == 0.5
    assert (state["daily"], state["sent_today"], state["max_connections"]) == (1000, 1, 2)
    assert (state["breaker"], state["fallbacks"]) == ("closed", ["backup"])


def test_overview_line_names_slow_down_daily_use_and_breaker() -> None:
    route = {"state": "ready", "tls": "TLSv1.3", "conn_id": "c-1", "messages_on_connection": 7,
             "limits": {"rate": 20, "rate_factor": 0.5, "daily": 1000, "sent_today": 1, "max_connections": 2,
                        "breaker": "open", "fallbacks": ["backup"]}}  # fmt: skip
    assert describe_route("default", route) == (
        "default: ready TLSv1.3, 7 mails on conn c-1; rate 20/s slowed down to x0.5; 1/1000 today; "
        "max 2 connections; breaker open (fallback backup)"
    )
    assert describe_route("plain", {"state": "new"}) == "plain: new"
