"""The route gate while Redis is away (seen in the chaos run: a Redis restarted mid-run answered a route's
limit script with ``BusyLoadingError`` and the whole batch job crashed). The gate's questions before a
send hold it back without spending anything; its bookkeeping after a send is skipped and never turns a
known outcome into an error."""

from __future__ import annotations

from collections.abc import Callable

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from servers import RedisServer

from dispatcher.errors import ServiceClosing
from dispatcher.routes.config import RoutePolicy
from dispatcher.routes.gate import RouteGate
from dispatcher.smtp.config import parse_smtp_url
from dispatcher.smtp.replies import Reply
from dispatcher.smtp.session import SmtpClient
from dispatcher.smtp.stages import Stage

MakeRedis = Callable[..., RedisServer]


def test_a_gate_whose_redis_is_away_holds_sends_back_and_skips_its_bookkeeping(
    make_redis_server: MakeRedis,
) -> None:
    server = make_redis_server()
    client = redis.Redis(port=server.port, retry=Retry(NoBackoff(), 0), socket_connect_timeout=1)
    policies = {
        "default": RoutePolicy("default", rate=1.0, fallbacks=("backup",)),  # one token per Redis call
        "backup": RoutePolicy("backup"),
    }
    gate = RouteGate(client, policies, max_wait=1)
    smtp = SmtpClient(parse_smtp_url("smtp://127.0.0.1:9?tls=off"))  # never connected: bookkeeping only
    assert gate.admit("default", smtp) is None  # Redis up: a token is there
    server.stop()
    try:
        pause = gate.admit("default", smtp)
        assert pause is not None and "limits cannot be read" in pause.reason and pause.until is None
        assert gate.admit_now("default") is False
        assert list(gate.candidates("default")) == ["default"]
        gate.answered("default", smtp)  # no exception: the outcome it follows stands
        closing = ServiceClosing("closing", stage=Stage.GREETING, reply=Reply(421, ("4.7.0 busy",)))
        assert gate.failed("default", smtp, closing) is False
    finally:
        client.close()
