"""An attempt's own calls (``SendStore.for_attempts``) hold one connection of the pool per thread instead of
taking one around every command; a call cut off mid-reply leaves nothing behind for the next one, and a
forked child never speaks on its parent's socket."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

import pytest
import redis

from dispatcher.errors import QueueUnavailable
from dispatcher.queue.producer import Producer
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore

MAIL = {"from": "app@example.com", "to": "a@example.org", "subject": "s", "text": "hi"}


class Cut(Exception):
    """What the alarm raises in the middle of a call (as a job timeout's signal does)."""


@pytest.fixture
def alarm() -> Iterator[None]:
    def cut(signum: int, frame: FrameType | None) -> None:
        raise Cut

    before = signal.signal(signal.SIGALRM, cut)
    yield
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, before)


def client_ids(connection: redis.Redis) -> set[int]:
    """The ids of the clients connected to Redis now, but the one asking."""
    own = connection.client_id()
    return {int(c["id"]) for c in connection.client_list()} - {own}


def test_an_attempts_calls_go_over_one_held_connection(redis_client: redis.Redis) -> None:
    send_id = Producer(redis_client).enqueue(MAIL).id
    store = SendStore.for_attempts(redis_client)
    assert SendStore.for_attempts(redis_client) is store and store.held is not None
    store.load(send_id)
    held, connected = store.held.client_id(), client_ids(redis_client)
    for attempt in range(20):
        assert store.load(send_id) is not None
        store.mark_data_out(send_id, attempt)
    assert store.held.client_id() == held  # every call on it
    assert client_ids(redis_client) == connected  # and no other connection made for them


def test_each_thread_has_its_own_store(redis_client: redis.Redis) -> None:
    mine = SendStore.for_attempts(redis_client)
    theirs: list[SendStore] = []
    thread = threading.Thread(target=lambda: theirs.append(SendStore.for_attempts(redis_client)))
    thread.start()
    thread.join()
    assert theirs and theirs[0] is not mine


def test_a_call_cut_off_before_its_reply_leaves_no_reply_for_the_next(
    redis_client: redis.Redis, redis_url: str, alarm: None
) -> None:
    first = Producer(redis_client).enqueue({**MAIL, "subject": "first"}).id
    second = Producer(redis_client).enqueue({**MAIL, "subject": "second"}).id
    store = SendStore.for_attempts(redis_client)
    store.load(first)  # connected
    other = redis.Redis.from_url(redis_url)
    try:
        other.client_pause(300)  # Redis answers nobody for 300 ms: the load below is cut off waiting
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(Cut):
            store.load(first)
        other.ping()  # answered once the pause is over: the cut-off load's reply is on the old connection now
        rec = store.load(second)
        assert rec is not None and rec.send_id == second and rec.mail["subject"] == "second"
    finally:
        other.close()


def test_a_forked_child_never_uses_its_parents_held_connection(redis_client: redis.Redis) -> None:
    send_id = Producer(redis_client).enqueue(MAIL).id
    parent = SendStore.for_attempts(redis_client)
    assert parent.load(send_id) is not None
    before = client_ids(redis_client)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a store of its own, on a connection of its own
        code = 1
        try:
            child = SendStore.for_attempts(redis_client)
            rec = child.load(send_id)
            assert child is not parent and child.held is not None and rec is not None
            os.write(write, str(child.held.client_id()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    child_client = int(os.read(read, 64) or b"0")
    os.close(read)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child_client not in before
    assert parent.load(send_id) is not None  # the parent's connection is still its own and in step


def test_a_script_redis_lost_is_loaded_again_on_the_held_connection(redis_client: redis.Redis) -> None:
    send_id = Producer(redis_client).enqueue(MAIL).id
    store = SendStore.for_attempts(redis_client)
    rec = store.load(send_id)
    assert rec is not None
    redis_client.script_flush()
    rec.move(SendState.SENDING)
    rec.attempts += 1
    assert store.begin_attempt(rec, now=time.time(), lease_seconds=60) is not None
    stored = store.load(send_id)
    assert stored is not None and stored.state is SendState.SENDING and stored.attempts == 1


def test_a_held_connection_redis_dropped_is_made_again_by_the_next_call(redis_client: redis.Redis) -> None:
    send_id = Producer(redis_client).enqueue(MAIL).id
    store = SendStore.for_attempts(redis_client)
    assert store.held is not None
    held = store.held.client_id()
    redis_client.client_kill_filter(_id=str(held))
    try:  # the connection's Retry decides whether this call asks again (redis-py's default: it does not)
        rec = store.load(send_id)
    except QueueUnavailable:
        rec = store.load(send_id)
    assert rec is not None and rec.send_id == send_id
    assert store.held.client_id() != held
