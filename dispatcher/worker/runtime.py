"""What one worker process keeps between jobs: its settings and its ``SmtpClient``s — one per route, and
up to ``connections`` (``worker.py --connections K``) for the batches that spread over several
(``delivery.lanes``).

rq's ``SimpleWorker`` runs jobs in the worker process itself, so a process-wide runtime is what lets the
SMTP connection outlive a job. The worker installs it at start and closes it (QUIT) at teardown; a job run
by any other rq worker gets one built from the environment on first use.
"""

from __future__ import annotations

import os
import re
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import redis

from dispatcher.delivery.journal import Journal
from dispatcher.errors import ConfigurationError, UnknownRoute
from dispatcher.queue.presence import Presence
from dispatcher.routes.gate import RouteGate
from dispatcher.routes.slots import ConnectionSlots, capped_client
from dispatcher.settings import Settings, load_settings
from dispatcher.smtp.config import SmtpConfig
from dispatcher.smtp.session import SmtpClient


def redis_identity(url: str) -> str:
    """A file name for the Redis at ``url``: host, port and database, never the credentials."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme == "unix":
        where = f"{parsed.path}_0"
    else:
        where = f"{parsed.hostname}_{parsed.port or 6379}_{parsed.path.strip('/') or '0'}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", where).strip("_")


class Runtime:
    _current: ClassVar[Runtime | None] = None

    def __init__(self, settings: Settings, worker_name: str | None = None, *, connections: int = 1) -> None:
        if connections < 1:
            raise ConfigurationError(f"connections must be at least 1, not {connections}")
        self.settings = settings
        self.worker_name = worker_name or f"{socket.gethostname()}.{os.getpid()}"
        self.connections = connections
        """How many connections to one route a batch may use at once (each a kept client of its own)."""
        self.clients: dict[str, SmtpClient] = {}
        self.more_clients: dict[str, list[SmtpClient]] = {}
        """Each route's kept clients past the first (``lane_clients``)."""
        self.adopted: dict[str, list[tuple[str, list[str]]]] = {}
        """By rq job id: the jobs its worker adopted for it (``worker.adoption``) — each one's id and send
        ids — for its ``deliver_batch`` to deliver with its own."""
        self.should_stop: Callable[[], bool] = lambda: False
        self._journal: Journal | None = None

    def stop_requested(self) -> bool:
        """True once the worker was asked to stop: a batch ends after its current send."""
        return self.should_stop()

    @classmethod
    def install(cls, runtime: Runtime) -> Runtime:
        cls._current = runtime
        return runtime

    @classmethod
    def current(cls) -> Runtime:
        if cls._current is None:
            cls._current = Runtime(load_settings(need_routes=True))
        return cls._current

    def journal(self) -> Journal:
        """This process's outcome journal (``delivery.journal``): in the host's journal directory, under
        the Redis it belongs to (an entry is only ever replayed into the Redis it was meant for)."""
        if self._journal is None:
            name = self.worker_name.replace("/", "_")
            directory = Path(self.settings.journal_dir) / redis_identity(self.settings.redis_url)
            self._journal = Journal(directory, name)
        return self._journal

    def gate(self, connection: redis.Redis) -> RouteGate:
        """The process's route gate on ``connection``: waits end well inside a job's timeout margin."""
        return RouteGate.for_process(connection, self.settings.policies, self.settings.job_timeout_margin / 2)

    def client(self, route: str, connection: redis.Redis | None = None) -> SmtpClient:
        """The kept client of ``route``; ``ConfigurationError`` if this worker has no such route. With
        ``connection`` and a route capped by ``max_connections``, the client holds a slot of the shared
        semaphore while its connection is open (``dispatcher.routes.slots``)."""
        client = self.clients.get(route)
        if client is None:
            client = self.clients[route] = self._new_client(route, connection)
        return client

    def lane_clients(self, route: str, count: int, connection: redis.Redis | None = None) -> list[SmtpClient]:
        """``count`` kept clients of ``route`` (``client`` first), each with its own connection — and, on a
        route capped by ``max_connections`` (given ``connection``), its own slot."""
        clients = [self.client(route, connection)]
        more = self.more_clients.setdefault(route, [])
        while len(more) < count - 1:
            more.append(self._new_client(route, connection))
        return clients + more[: count - 1]

    def _new_client(self, route: str, connection: redis.Redis | None) -> SmtpClient:
        config = self._config(route, connection)
        policy = self.settings.policies.get(route)
        if connection is not None and policy is not None and policy.max_connections is not None:
            return capped_client(config, ConnectionSlots(connection, policy))
        return SmtpClient(config)

    def all_clients(self, route: str) -> list[SmtpClient]:
        first = self.clients.get(route)
        return ([first] if first is not None else []) + self.more_clients.get(route, [])

    def _config(self, route: str, connection: redis.Redis | None) -> SmtpConfig:
        """``route``'s configuration; ``UnknownRoute`` (permanent) when no live worker publishes it, a plain
        ``ConfigurationError`` (transient: left for a worker that has it) when another one does."""
        try:
            return self.settings.route(route)
        except UnknownRoute as exc:
            if connection is not None and route in Presence(connection).known_routes():
                raise ConfigurationError(f"{exc}; other workers have it") from None
            raise

    def describe(self) -> dict[str, dict[str, object]]:
        """Each configured route with the state of this process's connections to it (no secrets): the
        first one's fields at the top (as with one connection), every one under ``connections``, and
        ``connections_per_process``, the most a batch of this process uses at once (``--connections``)."""
        routes: dict[str, dict[str, object]] = {}
        for name, config in self.settings.routes.items():
            clients = self.all_clients(name)
            routes[name] = {
                "url": config.redacted_url(),
                **_connection_state(clients[0] if clients else None),
                "connections_opened": sum(client.connections_opened for client in clients),
                "connections_per_process": self.connections,
                "connections": [_connection_state(client) for client in clients],
            }
        return routes

    def close(self) -> None:
        """QUIT every kept connection."""
        for name in self.settings.routes:
            for client in self.all_clients(name):
                client.close()


def _connection_state(client: SmtpClient | None) -> dict[str, object]:
    return {
        "state": client.state.value if client else "new",
        "conn_id": client.conn_id if client else None,
        "tls": client.tls_version if client else None,
        "messages_on_connection": client.messages_on_connection if client else 0,
    }
