"""An outcome, once known, is not dropped because Redis is away for a moment (issue 13, invariant 3): the
worker keeps it and writes it when Redis answers again. Observed: the accepted outcome was dropped, the
lease expired and the mail was sent again (31 duplicates over four AOF restart variants)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog
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
    with structlog.testing.capture_logs() as logs:
        worker = threading.Thread(target=lambda: result.update(attempt.run()), daemon=True)
        worker.start()
        wait_until(lambda: any(e["event"] == "outcome_write_retry" for e in logs), 20, message=str(logs))
        assert len(sink.wait_for_messages(1, 10)) == 1  # the server has it; Redis does not know yet
        server.restart()
        worker.join(30)
    try:
        assert result.get("state") == "delivered", result
        rec = load(client, done.id)
        assert rec.state == "delivered" and rec.data_out is None and rec.attempts == 1
        assert SendStore(client).ledger(rec.message_id) == {"kept@example.test"}
        assert len(sink.messages) == 1
    finally:
        runtime.close()
        client.close()
