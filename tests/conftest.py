"""Shared fixtures: TLS material, SMTP servers (recording and scripted), a private Redis.

Import helpers in tests as ``from helpers import wait_until, free_port`` and server classes as
``from servers import Fault, ScriptedSmtpServer`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog
import trustme
from servers.recording import RecordingSmtpServer
from servers.redis_server import RedisServer
from servers.scripted import ScriptedSmtpServer
from structlog.stdlib import ProcessorFormatter

from dispatcher.logs import reset_logging


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    """A throwaway certificate authority (trustme) for the whole session."""
    return trustme.CA()


@pytest.fixture(scope="session")
def tls_server_cert(tls_ca: trustme.CA) -> trustme.LeafCert:
    """A leaf certificate from ``tls_ca`` valid for ``localhost`` and ``127.0.0.1``."""
    return tls_ca.issue_cert("localhost", "127.0.0.1")


@pytest.fixture
def tls_server_context(tls_server_cert: trustme.LeafCert) -> ssl.SSLContext:
    """A fresh server-side SSLContext presenting ``tls_server_cert``; give it to a server's STARTTLS."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_server_cert.configure_cert(context)
    return context


@pytest.fixture
def tls_ca_file(tls_ca: trustme.CA, tmp_path: Path) -> Path:
    """Path of the CA certificate PEM in ``tmp_path``: what a client's ``cafile`` setting points at."""
    path = tmp_path / "test-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture
def tls_client_context(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A verifying client SSLContext (hostname checks on) that trusts only ``tls_ca``."""
    context = ssl.create_default_context()
    tls_ca.configure_trust(context)
    return context


@pytest.fixture
def smtp_server() -> Iterator[Callable[..., RecordingSmtpServer]]:
    """Factory: ``smtp_server(**DevSink kwargs) -> DevSink`` started on a free 127.0.0.1 port.

    e.g. ``sink = smtp_server(rules={"soft@x.org": Rule(450, "4.2.0 busy", times=1)})``, then
    ``sink.port``, ``sink.messages``, ``sink.commands``, ``sink.wait_for_messages(1, 5)``. Every server
    made is stopped at teardown.
    """
    started: list[RecordingSmtpServer] = []

    def make(**kwargs: Any) -> RecordingSmtpServer:
        kwargs.setdefault("port", 0)
        server = RecordingSmtpServer(**kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def scripted_server() -> Iterator[Callable[..., ScriptedSmtpServer]]:
    """Factory: ``scripted_server(**ScriptedSmtpServer kwargs) -> ScriptedSmtpServer``, started.

    e.g. ``scripted_server(faults={"rcpt": Fault("drop")}, ehlo_keywords=["PIPELINING", "CHUNKING"])``.
    Every server made is stopped at teardown (its sockets closed, so hung clients see EOF).
    """
    started: list[ScriptedSmtpServer] = []

    def make(**kwargs: Any) -> ScriptedSmtpServer:
        server = ScriptedSmtpServer(**kwargs)
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server subprocess for the session (no persistence), on a free port; never 6379."""
    server = RedisServer(data_dir=tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.close()


@pytest.fixture
def make_redis_server(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Factory for a private redis-server of your own (restart/crash tests): ``make_redis_server(
    appendonly=True) -> RedisServer``, started, data dir under ``tmp_path``; ``.restart()`` keeps port
    and data. Every server made is stopped at teardown."""
    started: list[RedisServer] = []

    def make(**kwargs: Any) -> RedisServer:
        kwargs.setdefault("data_dir", tmp_path / f"redis-{len(started)}")
        server = RedisServer(**kwargs)
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """``redis://127.0.0.1:PORT/0`` of the session's private Redis, emptied (FLUSHALL) before this test."""
    client = redis_server.client()
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    """A redis-py client on the freshly emptied private Redis of ``redis_url``."""
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture(scope="session", autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every worker of the session (in-process or a subprocess, which inherits the environment) keeps its
    outcome journal (``dispatcher.delivery.journal``) under a private ``XDG_STATE_HOME``, never the
    machine user's."""
    home = tmp_path_factory.mktemp("state-home")
    before = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(home)
    yield home
    if before is None:
        os.environ.pop("XDG_STATE_HOME", None)
    else:
        os.environ["XDG_STATE_HOME"] = before


@pytest.fixture(autouse=True)
def structlog_defaults() -> Iterator[None]:
    """Every test starts and ends with structlog's defaults — every level, the default chain — whatever a
    test before it configured in-process (``cli.main`` runs ``configure_logging(level="WARNING")``): so
    ``structlog.testing.capture_logs`` sees every event in any test order. ``reset_logging`` reaches the
    loggers an earlier configuration cached; the stdlib handlers and levels ``configure_logging`` set are
    taken off again."""
    root, rq = logging.getLogger(), logging.getLogger("rq")
    levels = root.level, rq.level
    reset_logging()
    yield
    reset_logging()
    structlog.contextvars.clear_contextvars()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h.formatter, ProcessorFormatter)]
    root.setLevel(levels[0])
    rq.setLevel(levels[1])
