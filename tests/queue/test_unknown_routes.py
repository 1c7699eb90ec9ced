"""A ``route`` no worker is configured with (issue 14: ``--route nosuchroute`` was accepted, then retried
for up to 2 days). Workers publish their route names (``Presence.publish_routes``, ``dispatch:routes``);
every producer — the Python API, ``enqueue.py send`` and ``bulk`` here, the HTTP API in
``tests/dashboard/test_api.py`` — refuses another route with a field error naming the known ones. With
none published it cannot tell and accepts; the worker then fails the send permanently, kind ``route``."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from helpers import wait_until
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

import dispatcher
from dispatcher import cli
from dispatcher.errors import ConfigurationError, UnknownRoute, ValidationError
from dispatcher.queue.presence import Presence
from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

SmtpServer = Callable[..., RecordingSmtpServer]
StartWorkers = Callable[..., WorkerRun]
BASE: dict[str, Any] = {"from": "a@example.com", "to": "b@example.org", "text": "x"}


def test_a_worker_publishes_its_routes_and_producers_refuse_others(
    redis_client: redis.Redis, redis_url: str, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    worker = start_workers(smtp_url(sink.port), env={"SMTP_URL_BULK": smtp_url(sink.port)})
    wait_until(
        lambda: Presence(redis_client).known_routes() == {"default", "bulk"},
        timeout=20,
        message=worker.text(),
    )

    with pytest.raises(ValidationError) as caught:
        dispatcher.enqueue({**BASE, "route": "nosuchroute"}, connection=redis_client)
    assert caught.value.problems == {
        "route": "no worker is configured with route 'nosuchroute' (known: bulk, default)"
    }
    with pytest.raises(ValidationError) as many:
        dispatcher.enqueue_many([BASE, {**BASE, "route": "bulkk"}], connection=redis_client)
    assert list(many.value.problems) == ["[1].route"]

    out, err = io.StringIO(), io.StringIO()
    send = [
        "--redis-url",
        redis_url,
        "send",
        "--from",
        "a@example.com",
        "--to",
        "b@example.org",
        "--text",
        "x",
    ]
    assert cli.main([*send, "--route", "nosuchroute"], out, err) == cli.EXIT_USAGE
    assert "route: no worker is configured with route 'nosuchroute' (known: bulk, default)" in err.getvalue()
    assert cli.main([*send, "--route", "bulk"], io.StringIO(), io.StringIO()) == 0

    sent = dispatcher.enqueue({**BASE, "route": "bulk"}, connection=redis_client)
    wait_until(
        lambda: SendStore(redis_client).load(sent).state == "delivered", timeout=20, message=worker.text()
    )


def test_bulk_reports_the_line_with_an_unknown_route(
    redis_client: redis.Redis, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    Presence(redis_client).publish_routes(["default"], ttl=60)
    lines = [json.dumps(BASE), json.dumps({**BASE, "route": "nosuchroute"})]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--redis-url", redis_url, "bulk", "-"], out, err) == cli.EXIT_INVALID_LINES
    assert json.loads(out.getvalue())["enqueued"] == 1
    assert (
        "line 2: route: no worker is configured with route 'nosuchroute' (known: default)" in err.getvalue()
    )


def test_expired_sightings_count_as_none(redis_client: redis.Redis) -> None:
    Presence(redis_client).publish_routes(["default"], ttl=10, now=time.time() - 11)
    assert Presence(redis_client).known_routes() == frozenset()
    assert Producer(redis_client).enqueue({**BASE, "route": "nosuchroute"}).id  # cannot tell: accepted


def test_with_no_route_published_the_worker_fails_the_send_permanently(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    send_id = Producer(redis_client).enqueue({**BASE, "route": "nosuchroute"}).id
    worker = start_workers(smtp_url(sink.port))
    store = SendStore(redis_client)
    wait_until(lambda: store.load(send_id).state == "failed", timeout=20, message=worker.text())
    rec = store.load(send_id)
    assert rec is not None and rec.attempts == 1 and rec.next_attempt_at is None
    outcome = rec.outcomes["b@example.org"]
    assert outcome.status == "permanent" and outcome.kind == "route"
    assert outcome.text == "route 'nosuchroute' is not configured on this worker (known: default)"
    assert sink.messages == []


def test_a_route_another_worker_publishes_is_left_to_it(redis_client: redis.Redis) -> None:
    runtime = Runtime(load_settings({"SMTP_URL": "smtp://127.0.0.1:25?tls=off"}))
    with pytest.raises(UnknownRoute):
        runtime.client("bulk", redis_client)
    Presence(redis_client).publish_routes(["default", "bulk"], ttl=60)
    with pytest.raises(ConfigurationError) as caught:
        runtime.client("bulk", redis_client)
    assert not isinstance(caught.value, UnknownRoute) and "other workers have it" in str(caught.value)
