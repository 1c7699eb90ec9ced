"""Producers tell the truth (issue 13, invariant 7): Redis going away in the middle of a large enqueue is
reported with exactly what was stored — ``enqueue_many``, ``enqueue.py bulk`` — and a rerun from there with
idempotency keys enqueues every mail exactly once. Observed: ``bulk`` said "nothing was enqueued" after
2,000 lines were stored, so a rerun sent them twice."""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from servers import RedisServer

from dispatcher import cli
from dispatcher.errors import PartiallyEnqueued
from dispatcher.mail.message import Mail
from dispatcher.queue.producer import BATCH, Enqueued, Producer
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore

MakeRedis = Callable[..., RedisServer]


def mails(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [{"from": "app@example.com", "to": f"u{i}@example.org", "subject": f"s{i}", "text": "hi",
             "key": f"truth-{i}"} for i in range(start, start + n)]  # fmt: skip


def stored_count(server: RedisServer) -> int:
    client = server.client()
    try:
        return SendStore(client).count_states()[SendState.QUEUED]
    finally:
        client.close()


def test_enqueue_many_says_which_items_were_stored(make_redis_server: MakeRedis) -> None:
    server = make_redis_server(appendonly=True)
    client = server.client()

    class RedisDiesAfterTheFirstBatch(Producer):
        def enqueue_valid(self, items: Sequence[Mail]) -> list[Enqueued]:
            done = super().enqueue_valid(items)
            server.stop()  # a real outage, between two batches
            return done

    with pytest.raises(PartiallyEnqueued) as caught:
        RedisDiesAfterTheFirstBatch(client).enqueue_many(mails(BATCH + 200))
    outage = caught.value
    assert outage.first_not_enqueued == BATCH
    assert all(isinstance(r, Enqueued) for r in outage.results[:BATCH])
    assert all(r is None for r in outage.results[BATCH:])
    assert f"items from [{BATCH}] on were not" in str(outage)
    client.close()
    server.restart()
    assert stored_count(server) == BATCH
    client = server.client()
    try:  # the rerun of the rest, keys included, stores each mail once
        Producer(client).enqueue_many(mails(BATCH + 200))
    finally:
        client.close()
    assert stored_count(server) == BATCH + 200


class LinesThatStopRedis(io.StringIO):
    """stdin for ``bulk`` that takes Redis away when line ``at`` is read (mid-way through a batch)."""

    def __init__(self, lines: list[str], server: RedisServer, at: int) -> None:
        super().__init__("".join(lines))
        self.lines, self.server, self.at = lines, server, at

    def __iter__(self) -> Iterator[str]:
        for number, line in enumerate(self.lines, start=1):
            if number == self.at:
                self.server.stop()
            yield line


def test_bulk_says_from_which_line_to_rerun(
    make_redis_server: MakeRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = make_redis_server(appendonly=True)
    lines = [json.dumps(m) + "\n" for m in mails(BATCH * 2)]
    monkeypatch.setattr("sys.stdin", LinesThatStopRedis(lines, server, at=BATCH + 100))
    out, err = io.StringIO(), io.StringIO()
    code = cli.main(["--redis-url", server.url, "bulk", "-"], out, err)
    assert code == cli.EXIT_UNAVAILABLE, err.getvalue()
    summary = json.loads(out.getvalue())
    assert summary["enqueued"] == BATCH and summary["not_enqueued_from_line"] == BATCH + 1
    assert f"every valid line before line {BATCH + 1} was enqueued" in err.getvalue()
    server.restart()
    assert stored_count(server) == BATCH
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(lines[BATCH:])))  # rerun from that line
    out = io.StringIO()
    assert cli.main(["--redis-url", server.url, "bulk", "-"], out, io.StringIO()) == 0
    assert json.loads(out.getvalue())["enqueued"] == BATCH
    assert stored_count(server) == 2 * BATCH
