"""What this process has learnt about particular servers, kept in memory for every connection to them.

Today one thing: a server that refuses commands pipelined after the end of a message's data. Haraka 3.3
answers every such command with ``503 … pipelined after end of DATA`` (a deliberate choice of Haraka's;
RFC 2920 §3.1 allows the pipelining). Once a stream has seen that, no later stream to the same host and
port pipelines across the end of data: the next envelope waits for the reply to the final dot. The
memory is per process, keyed by (host, port), and never written anywhere: a restarted worker learns it
again at the cost of one resent command group.
"""

from __future__ import annotations

import threading


class ServerQuirks:
    """Thread-safe memory of servers that refuse pipelining after the end of data."""

    def __init__(self) -> None:
        self._no_pipelining_after_data: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def pipelines_after_data(self, host: str, port: int) -> bool:
        with self._lock:
            return (host.lower(), port) not in self._no_pipelining_after_data

    def stop_pipelining_after_data(self, host: str, port: int) -> bool:
        """Remember the server; True only the first time (so the caller logs it once)."""
        key = (host.lower(), port)
        with self._lock:
            if key in self._no_pipelining_after_data:
                return False
            self._no_pipelining_after_data.add(key)
            return True

    def forget(self) -> None:
        with self._lock:
            self._no_pipelining_after_data.clear()


SERVER_QUIRKS = ServerQuirks()
