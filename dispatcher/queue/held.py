"""Commands on a connection held from a client's pool (``HeldConnection``): what a delivery attempt's own
calls go over (``SendStore.for_attempts``).

redis-py takes a connection from the pool and gives it back around every command: a readiness poll, two
``getpid`` and the pool's bookkeeping each time, and ``execute_command`` adds its per-command
observability, HIMPORT and lock steps — nothing here uses them. A worker sends four such commands a mail
(read the record, begin, the data-out marker, the outcome); holding one connection (redis-py's
``Redis.client()``) and sending on it directly (``send_command``, ``parse_response``: the reply callbacks
apply) takes ~0.13 ms off a worker's ~1.2 ms of CPU per mail (issue 15; ``bench.redis_commands``).

Kept from ``execute_command``: the connection's own ``Retry`` (a disconnect between tries) and the
errors it raises. Added: **a command cut off by any exception drops the connection** (a job timeout's
signal between a command and its reply): the reply may still be on its way, and no later command may read
a reply that was not its own. The connection is made on first use (the caller maps an outage), and one
belongs to one thread: lanes run in threads, each with its own (``SendStore.for_attempts``).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.commands.core import Script


class HeldConnection:
    """One connection of ``connection``'s pool, held from the first command until ``close``."""

    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self._client: redis.Redis | None = None

    def call(self, *args: Any) -> Any:
        """One command, its reply parsed as ``execute_command`` parses it."""
        if self._client is None:
            self._client = self.redis.client()  # type: ignore[no-untyped-call]
        client = self._client
        conn = client.connection
        assert conn is not None, "a single-connection client holds its connection until closed"

        def once() -> Any:
            conn.send_command(*args)
            return client.parse_response(conn, args[0])

        def failed(error: BaseException) -> None:
            conn.disconnect()

        try:
            return conn.retry.call_with_retry(once, failed)
        except BaseException as exc:
            failed(exc)
            raise

    def script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        """``script`` by its digest (EVALSHA), loaded again when Redis lost it (a restart, ``SCRIPT
        FLUSH``), as redis-py's ``Script`` does."""
        try:
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            sha = self.call("SCRIPT LOAD", script.script)
            script.sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            return self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def close(self) -> None:
        """Give the connection back to the pool (a later command takes one again)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def client_id(self) -> int:
        """Redis's id of the held connection (``CLIENT ID``): tests tell connections apart by it."""
        return int(self.call("CLIENT ID"))
