"""An outcome, once known, is not dropped because Redis is away for a moment (issue 13, invariant 3): the
worker keeps it and writes it when Redis answers again. Observed: the accepted outcome was dropped, the
lease expired and the mail was sent again (31 duplicates over four AOF restart variants)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from helpers import wait_until
from retrykit import env_for, load, mail, smtp_url
from servers import RecordingSmtpServer, RedisServer

from dispatcher.delivery.attempt import Attempt
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

Sink = Callable[..., RecordingSmtpServer]
MakeRedis = Callable[..., RedisServer]


def test_an_outcome_known_while_redis_is_away_is_written_when_it_returns(
    make_redis_server: MakeRedis, smtp_server: Sink
) -> None:
    server = make_redis_server(appendonly=True)
    client = server.client()
    sink = smtp_server()
    done = Producer(client).enqueue(mail(["kept@example.test"]))
    runtime = Runtime(load_settings(env_for(server.url, smtp_url(sink.port)), need_routes=True))

    class RedisGoesAwayWithTheDataOnTheWire(Attempt):
        def data_going_out(self) -> None:
            super().data_going_out()  # durable first: the marker is in Redis
            server.stop()  # then Redis is gone for the rest of the attempt

    result: dict[str, Any] = {}
    attempt = RedisGoesAwayWithTheDataOnTheWire(runtime, client, done.id, done.id)
    worker = threading.Thread(target=lambda: result.update(attempt.run()), daemon=True)
    worker.start()
    # The server has the mail: the attempt's only step left is writing its outcome, into a Redis that is
    # gone (its first try fails at once; bringing a redis-server back takes far longer).
    assert len(sink.wait_for_messages(1, 10)) == 1
    # Past redis-py's own few quick retries: the attempt must hold on to the outcome and try again.
    wait_until(lambda: getattr(attempt, "write_retries", 0) >= 1 or not worker.is_alive(), 60)
    assert worker.is_alive() and not result, "the attempt gave up while Redis was away"
    server.restart()
    worker.join(30)
    try:
        assert result.get("state") == "delivered", result
        rec = load(client, done.id)
        assert rec.state == "delivered" and rec.data_out is None and rec.attempts == 1
        assert SendStore(client).never_again(rec) == {"kept@example.test"}
        assert len(sink.messages) == 1
    finally:
        runtime.close()
        client.close()
