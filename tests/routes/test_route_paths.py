"""Route limits keep their word on every path (issue 17), with real worker pools and scripted servers.

A ``421 4.7.0`` that the client recovered from (its free reconnect before MAIL) is still a reply the route
got: the limiter slows down on a lock-step server and on routes with ``max_connections`` or ``fallback``
exactly as on the streamed path. A send the daily cap holds back is deferred until the cap's window
resets — no attempt spent, its age not counting, never failed unsent — and costs a bounded number of jobs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from helpers import wait_until
from route_support import Workers, mails, route_url
from rq import Queue
from rq.serializers import JSONSerializer
from servers import Fault, RecordingSmtpServer, ScriptedSmtpServer

from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

Scripted = Callable[..., ScriptedSmtpServer]
Sink = Callable[..., RecordingSmtpServer]
Start = Callable[..., Workers]
RATE_LIMITED = b"421 4.7.0 rate limited, slow down\r\n"


def _enqueue(client: redis.Redis, batch: list[dict[str, Any]]) -> list[str]:
    producer = Producer(client)
    return [done.id for done in producer.enqueue_valid([producer.validate(m) for m in batch])]


def _states(client: redis.Redis, ids: list[str]) -> list[str | None]:
    store = SendStore(client)
    return [rec.state if (rec := store.load(i)) else None for i in ids]


@pytest.mark.parametrize(
    ("keywords", "options"),
    [(["8BITMIME"], {}),
     (["PIPELINING", "8BITMIME"], {"max_connections": 2}),
     (["PIPELINING", "8BITMIME"], {"fallback": "backup"})],
    ids=["lockstep", "max_connections", "fallback"],
)  # fmt: skip
def test_a_recovered_421_slows_the_route_on_every_path(
    scripted_server: Scripted,
    smtp_server: Sink,
    redis_client: redis.Redis,
    start_workers: Start,
    keywords: list[str],
    options: dict[str, Any],
) -> None:
    server = scripted_server(
        ehlo_keywords=keywords,
        faults={"mail": Fault("reply", RATE_LIMITED, occurrence=1)},
        faults_on_connection=1,
    )
    env = {"SMTP_URL": route_url(server.port, rate=10, slowdown_step=30, **options)}
    if "fallback" in options:
        env["SMTP_URL_BACKUP"] = route_url(smtp_server().port)
    ids = _enqueue(redis_client, mails(3, "recovered"))
    workers = start_workers(env, concurrency=1)
    wait_until(lambda: _states(redis_client, ids).count("delivered") == 3, timeout=30, message=workers.tail())
    assert server.connection_count >= 2, "the 421 should have cost a reconnect"
    slowed = workers.events("route_slowed_down")
    assert slowed, f"the recovered 421 never reached the limiter\n{workers.tail()}"
    assert slowed[0]["code"] == 421 and slowed[0]["factor"] == 0.5 and slowed[0]["route"] == "default"


def test_daily_capped_mail_waits_for_the_reset_and_never_fails_unsent(
    smtp_server: Sink, redis_client: redis.Redis, start_workers: Start
) -> None:
    sink = smtp_server()
    ids = _enqueue(redis_client, mails(12, "capped"))
    env = {
        "SMTP_URL": route_url(sink.port, daily=4, daily_period=8),
        "DISPATCH_RETRY_MAX_AGE": "3",
        "DISPATCH_RETRY_BASE": "0.5",
        "DISPATCH_RETRY_MAX_DELAY": "1",
    }
    # The cap counts per 8 s window of the clock: start at the top of one, so the first four sends and the
    # eight it holds back fall in the same window however the start-up's length falls.
    wait_until(lambda: time.time() % 8 < 0.5, timeout=9, interval=0.02, message="no cap window began")
    workers = start_workers(env, concurrency=2)
    wait_until(lambda: len(sink.messages) >= 4, timeout=20, message=workers.tail())
    wait_until(
        lambda: _states(redis_client, ids).count("deferred") == 8,
        timeout=10,
        message=str(_states(redis_client, ids)),
    )
    store = SendStore(redis_client)
    held = [rec for i in ids if (rec := store.load(i)) is not None and rec.state == "deferred"]
    assert all(rec.attempts == 0 for rec in held), [rec.attempts for rec in held]
    assert all("resumes at" in str(rec.status().get("reason", {}).get("text")) for rec in held)
    # While capped, each held send waits for the reset: no job per send every few seconds.
    queue_jobs = sum(Queue(name, connection=redis_client, serializer=JSONSerializer).count
                     for name in ("mail-high", "mail-default", "mail-bulk"))  # fmt: skip
    assert queue_jobs == 0
    wait_until(
        lambda: _states(redis_client, ids).count("delivered") == 12, timeout=40, message=workers.tail()
    )
    assert "failed" not in _states(redis_client, ids)
    assert len(sink.messages) == 12
    capped = workers.events("mail_throttled")
    assert len(capped) <= 2 * 8, f"{len(capped)} cap hits for 8 held sends"
