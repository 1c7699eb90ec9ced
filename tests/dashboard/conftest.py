"""Fixtures for the dashboard tests: the app on the session's private Redis, clients, a failed send."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import redis
from dashboard_support import deliver_queued, log_in, mail, make_config
from flask import Flask
from flask.testing import FlaskClient
from servers.recording import RecordingSmtpServer, Rule

from dispatcher.dashboard import create_app, state
from dispatcher.queue.producer import Producer


@pytest.fixture
def app(redis_url: str) -> Iterator[Flask]:
    flask_app = create_app(make_config(redis_url))
    yield flask_app
    with flask_app.app_context():
        state().redis.close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def logged_in(client: FlaskClient) -> FlaskClient:
    log_in(client)
    return client


@pytest.fixture
def make_failed(
    redis_url: str, redis_client: redis.Redis, smtp_server: Callable[..., RecordingSmtpServer]
) -> Callable[..., list[str]]:
    """``make_failed("a@x.org", "b@y.org")``: one send per recipient, refused 550 (or ``code``) by a
    real sink and recorded by a real worker; returns the send ids (their state is ``failed``)."""

    def make(*recipients: str, code: int = 550, text: str = "5.1.1 no such user") -> list[str]:
        sink = smtp_server(rules={r.lower(): Rule(code, text) for r in recipients})
        producer = Producer(redis_client)
        ids = [producer.enqueue(mail(to=[r], subject=f"Hello {r}")).id for r in recipients]
        deliver_queued(redis_url, sink.port)
        return ids

    return make
