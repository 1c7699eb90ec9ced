"""A bulk enqueue pauses Python's cyclic collector for the call (its passes over the mails it holds cost
more than rq's own ``enqueue_many`` per job, issue 15) and always gives it back as it found it."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from helpers import free_port
from redis.backoff import NoBackoff
from redis.retry import Retry

from dispatcher.errors import QueueUnavailable, ValidationError
from dispatcher.queue.producer import Producer, enqueue_many


def mails(seen: list[bool], n: int = 3) -> Iterator[dict[str, Any]]:
    """Mails that note, as each is read, whether the collector runs."""
    for i in range(n):
        seen.append(gc.isenabled())
        yield {"from": "app@example.com", "to": f"u{i}@example.org", "subject": "s", "text": "hi"}


BULK: dict[str, Callable[[redis.Redis, Iterator[dict[str, Any]]], object]] = {
    "enqueue_many": lambda client, items: enqueue_many(items, connection=client),
    "Producer.enqueue_many": lambda client, items: Producer(client).enqueue_many(items),
}


@pytest.mark.parametrize("bulk", sorted(BULK))
def test_the_collector_is_paused_during_a_bulk_enqueue_and_on_after(
    bulk: str, redis_client: redis.Redis
) -> None:
    seen: list[bool] = []
    assert gc.isenabled()
    BULK[bulk](redis_client, mails(seen))
    assert seen == [False, False, False]
    assert gc.isenabled()


@pytest.mark.parametrize("bulk", sorted(BULK))
def test_a_collector_the_application_turned_off_stays_off(bulk: str, redis_client: redis.Redis) -> None:
    gc.disable()
    try:
        BULK[bulk](redis_client, mails([]))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_the_collector_is_back_after_a_refused_batch_or_an_outage(redis_client: redis.Redis) -> None:
    with pytest.raises(ValidationError):
        enqueue_many([{"from": "bad", "to": "x@example.org", "text": "t"}], connection=redis_client)
    assert gc.isenabled()
    unreachable = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    with pytest.raises(QueueUnavailable):
        enqueue_many(mails([]), connection=unreachable)
    assert gc.isenabled()
