"""Loopback TCP proxy that adds a fixed one-way delay in both directions (RTT = 2 x delay).

Every chunk read from either side is stamped with ``now + delay`` and appended to that direction's
queue; a timer on the proxy's own event loop writes out every chunk whose deadline has passed. The
reader is never blocked by the delay, so throughput is not serialised: a pipelined burst of commands
arrives ``delay`` later as a burst, exactly like a long fat pipe (there is no bandwidth limit).

TCP handshake emulation: a client's ``connect()`` to the proxy returns at once (the kernel finishes the
loopback handshake before any user code runs), so by default the proxy dials the upstream only after
``3 x delay`` (SYN there, SYN-ACK back, ACK there). With the greeting's own trip back the client sees
the SMTP banner 2 RTT after connecting, as it would over a real link. Bytes the client sends before the
upstream is connected wait in the queue. Pass ``emulate_handshake=False`` to dial at once.

The proxy runs one asyncio loop in a daemon thread of the calling process; start()/stop(); ``.port``.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import threading
from collections.abc import Callable


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _DelayedWriter:
    """One direction: a FIFO of (deadline, bytes) flushed by a loop timer, order preserved."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self._loop = loop
        self._delay = delay
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None
        self._transport: asyncio.Transport | None = None
        self._eof_pending = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._flush()

    def push(self, data: bytes) -> None:
        if self._delay <= 0 and not self._queue and self._transport is not None:
            self._transport.write(data)
            return
        self._queue.append((self._loop.time() + self._delay, data))
        self._schedule()

    def push_eof(self) -> None:
        """Close the far side once everything queued before the EOF has been delivered."""
        self._eof_pending = True
        self._flush()

    def _schedule(self) -> None:
        if self._timer is None and self._queue and self._transport is not None:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        self._timer = None
        if self._transport is None or self._transport.is_closing():
            return
        now = self._loop.time()
        while self._queue and self._queue[0][0] <= now:
            self._transport.write(self._queue.popleft()[1])
        if self._queue:
            self._schedule()
        elif self._eof_pending:
            self._transport.close()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()


class _Side(asyncio.Protocol):
    """The upstream side: forwards everything it reads into the writer towards the client."""

    def __init__(self, outbound: _DelayedWriter, on_lost: Callable[[], None]) -> None:
        self.outbound = outbound
        self._on_lost = on_lost

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        self.outbound.push(data)

    def eof_received(self) -> bool:
        self.outbound.push_eof()
        return True  # keep our write half open until the other direction drains

    def connection_lost(self, exc: Exception | None) -> None:
        self._on_lost()


class _Pair:
    """A client connection and its upstream connection."""

    def __init__(self, proxy: DelayProxy, client: asyncio.Transport) -> None:
        loop = proxy.loop
        self.to_upstream = _DelayedWriter(loop, proxy.delay)
        self.to_client = _DelayedWriter(loop, proxy.delay)
        self.to_client.attach(client)
        self.client = client
        self.upstream: asyncio.Transport | None = None
        self.client_gone = False
        self.upstream_gone = False
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for writer in (self.to_upstream, self.to_client):
            writer.cancel()
        self.client.close()
        if self.upstream is not None:
            self.upstream.close()


class DelayProxy:
    """Forward 127.0.0.1:<port> to (target_host, target_port) with ``delay`` seconds each way."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        delay: float,
        *,
        emulate_handshake: bool = True,
        listen_host: str = "127.0.0.1",
    ) -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self.emulate_handshake = emulate_handshake
        self.listen_host = listen_host
        self.port = 0
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._pairs: set[_Pair] = set()

    def start(self) -> DelayProxy:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="delay-proxy", daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError("delay proxy did not start")
        return self

    @property
    def thread_id(self) -> int | None:
        """Native id of the proxy's event-loop thread (for its CPU time in /proc/self/task)."""
        return self._thread.native_id if self._thread is not None else None

    def stop(self) -> None:
        if self._thread is None:
            return
        self.loop.call_soon_threadsafe(self.loop.create_task, self._shutdown())
        self._thread.join(10)
        self._thread = None

    def __enter__(self) -> DelayProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self._server = self.loop.run_until_complete(
            self.loop.create_server(self._accept, self.listen_host, 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()
        self.loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self._pairs):
            pair.close()
        await asyncio.sleep(0)
        self.loop.stop()

    def _accept(self) -> asyncio.Protocol:
        return _ClientSide(self)

    def _register(self, client: asyncio.Transport) -> _Pair:
        pair = _Pair(self, client)
        self._pairs.add(pair)
        self.connections += 1
        dial_after = 3 * self.delay if self.emulate_handshake else 0.0
        self.loop.call_later(dial_after, lambda: self.loop.create_task(self._dial(pair)))
        return pair

    def _side_lost(self, pair: _Pair, upstream: bool) -> None:
        """One side hung up: deliver what is still queued towards the other side, then close it."""
        if upstream:
            pair.upstream_gone = True
            pair.to_upstream.cancel()
            pair.to_client.push_eof()
        else:
            pair.client_gone = True
            pair.to_client.cancel()
            pair.to_upstream.push_eof()
        if pair.client_gone and pair.upstream_gone:
            pair.closed = True
            self._pairs.discard(pair)

    async def _dial(self, pair: _Pair) -> None:
        if pair.closed:
            return

        def lost() -> None:
            self._side_lost(pair, upstream=True)

        try:
            transport, _ = await self.loop.create_connection(
                lambda: _Side(pair.to_client, lost), *self.target
            )
        except OSError:
            lost()
            return
        assert isinstance(transport, asyncio.Transport)
        pair.upstream = transport
        pair.to_upstream.attach(transport)


class _ClientSide(asyncio.Protocol):
    """The accepted side: creates the pair (and schedules the upstream dial) on connect."""

    def __init__(self, proxy: DelayProxy) -> None:
        self._proxy = proxy
        self._pair: _Pair | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        _set_nodelay(transport)
        assert isinstance(transport, asyncio.Transport)
        self._pair = self._proxy._register(transport)

    def data_received(self, data: bytes) -> None:
        assert self._pair is not None
        self._pair.to_upstream.push(data)

    def eof_received(self) -> bool:
        assert self._pair is not None
        self._pair.to_upstream.push_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._pair is not None:
            self._proxy._side_lost(self._pair, upstream=False)
