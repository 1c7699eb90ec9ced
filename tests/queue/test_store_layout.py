"""The send store's key layout after issue 15's cut of an attempt's Redis commands, each part through the
store's own calls against a real Redis:

* the mail lives in its record (``source``), and listings read records without it;
* one index per state and priority (``unsorted`` when the priority cannot be read), none for ``sending``,
  whose index is the in-flight set; counts, listings and the deliveries-per-minute chart come from them;
* the ledger stays the Message-ID's, for a generated Message-ID too (the app is given it back);
* a send stored by the earlier layout (mail at ``dispatch:source:<id>``) is still sent;
* final records have no TTL: ``sweep_final`` deletes those past ``RECORD_TTL`` with their index entries
  (the earlier layout left index entries behind for ever when a record's TTL ran out), and a worker's
  maintenance runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

from dispatcher.dashboard.stats import overview
from dispatcher.queue.keys import INFLIGHT, RECORD_TTL, ledger_key, legacy_source_key, send_key, state_key
from dispatcher.queue.producer import Producer
from dispatcher.queue.records import DeliveryStatus, RecipientRecord, SendRecord
from dispatcher.queue.states import SendState
from dispatcher.queue.store import SendStore

MAIL = {"from": "app@example.com", "to": ["a@example.org", "b@example.org"], "subject": "s", "text": "hi"}
GIVEN_ID = "<order-7@shop.example.com>"


def enqueue(client: redis.Redis, **extra: object) -> SendRecord:
    """A send enqueued, loaded whole (with its mail) as an attempt loads it."""
    send_id = Producer(client).enqueue({**MAIL, **extra}).id
    rec = SendStore(client).load_whole(send_id)
    assert rec is not None
    return rec


def begin(store: SendStore, rec: SendRecord) -> tuple[set[str], bytes | None]:
    rec.move(SendState.SENDING)
    rec.attempts += 1
    begun = store.begin_attempt(rec, now=time.time(), lease_seconds=60)
    assert begun is not None
    return begun


def deliver(store: SendStore, rec: SendRecord, accepted: list[str], *, now: float | None = None) -> None:
    for recipient in accepted:
        rec.outcomes[recipient] = RecipientRecord(DeliveryStatus.ACCEPTED)
    rec.move(SendState.DELIVERED)
    store.record_outcome(rec, accepted, now=time.time() if now is None else now)


def keys_like(client: redis.Redis, pattern: str) -> list[bytes]:
    return sorted(client.scan_iter(match=pattern))


def test_the_mail_is_in_its_record_and_listings_read_records_without_it(redis_client: redis.Redis) -> None:
    rec = enqueue(redis_client)
    store = SendStore(redis_client)
    assert rec.source is not None and b'"subject":"s"' in rec.source
    assert keys_like(redis_client, "dispatch:source:*") == []
    (listed,) = store.load_many([rec.send_id])
    assert listed.source is None and listed.raw is None
    assert listed.state is SendState.QUEUED and listed.recipients == MAIL["to"]
    assert store.load_many_tolerant([rec.send_id, "mail-missing"])[0][0].source is None
    summary = store.load(rec.send_id)  # every reader but an attempt: a retry moves no attachment
    assert summary is not None and summary.source is None and summary.recipients == MAIL["to"]


def test_one_index_per_state_and_priority_and_sending_is_the_leases(redis_client: redis.Redis) -> None:
    store = SendStore(redis_client)
    rec = enqueue(redis_client)
    high = enqueue(redis_client, priority="high")
    assert redis_client.zscore(state_key("queued", "default"), rec.send_id) is not None
    assert redis_client.zscore(state_key("queued", "high"), high.send_id) is not None
    assert keys_like(redis_client, "dispatch:state:queued") == []  # no overall index
    assert store.count_states()[SendState.QUEUED] == 2
    assert store.count_states("high")[SendState.QUEUED] == 1

    begin(store, rec)
    assert keys_like(redis_client, "dispatch:state:sending*") == []
    assert redis_client.zscore(INFLIGHT, rec.send_id) is not None
    assert redis_client.zscore(state_key("queued", "default"), rec.send_id) is None
    assert store.ids_in_state(SendState.SENDING) == [rec.send_id]
    assert store.ids_in_state(SendState.QUEUED) == [high.send_id]
    assert store.count_states()[SendState.SENDING] == 1
    assert store.count_states("default")[SendState.SENDING] == 1
    assert store.count_states("high")[SendState.SENDING] == 0

    deliver(store, rec, ["a@example.org", "b@example.org"])
    assert store.ids_in_state(SendState.SENDING) == []
    assert store.count_states()[SendState.DELIVERED] == 1
    assert store.count_states()[SendState.SENDING] == 0


def test_a_leased_send_that_is_still_queued_is_not_counted_as_sending(redis_client: redis.Redis) -> None:
    """A batch leases its sends before it begins them (and adoption leases whole jobs): still queued."""
    store = SendStore(redis_client)
    rec = enqueue(redis_client)
    store.lease([rec.send_id], time.time() + 60)
    assert store.count_states()[SendState.SENDING] == 0
    assert store.count_states()[SendState.QUEUED] == 1
    assert store.ids_in_state(SendState.SENDING) == []


def test_listings_merge_every_priority_newest_first(redis_client: redis.Redis) -> None:
    store = SendStore(redis_client)
    ids = []
    for priority in ("bulk", "high", "default", "high"):
        ids.append(enqueue(redis_client, priority=priority).send_id)
    assert store.ids_in_state(SendState.QUEUED) == ids[::-1]
    assert store.ids_in_state(SendState.QUEUED, limit=2) == ids[:1:-1]
    assert store.waiting_since([SendState.QUEUED], time.time() + 1, 3) == ids[:3]


def test_deliveries_per_minute_are_counted_from_the_delivered_index(redis_client: redis.Redis) -> None:
    store = SendStore(redis_client)
    minute = (int(time.time()) // 60) * 60
    for at in (minute - 60 + 1, minute + 1, minute + 2):
        rec = enqueue(redis_client)
        begin(store, rec)
        deliver(store, rec, ["a@example.org", "b@example.org"], now=at)
    assert store.delivered_per_minute(3, now=minute + 5) == [(minute - 120, 0), (minute - 60, 1), (minute, 2)]
    assert keys_like(redis_client, "dispatch:delivered:*") == []


def test_a_generated_message_id_given_back_by_the_app_shares_the_ledger(redis_client: redis.Redis) -> None:
    """The review of the first version of this layout: a generated Message-ID is returned to the app
    (``Enqueued.message_id``), which may enqueue the message again with it — the ledger is the
    Message-ID's, read by every send of it, so who accepted the first send is not sent to again."""
    store = SendStore(redis_client)
    first = enqueue(redis_client)
    begin(store, first)
    deliver(store, first, ["a@example.org"])
    assert store.ledger(first.message_id) == {"a@example.org"}
    again = enqueue(redis_client, message_id=first.message_id)
    ledger, _ = begin(store, again)
    assert ledger == {"a@example.org"}


def test_a_given_message_id_shares_its_ledger_across_sends(redis_client: redis.Redis) -> None:
    """Two sends of one Message-ID the app gave: what the first delivered, the second never sends."""
    store = SendStore(redis_client)
    first = enqueue(redis_client, message_id=GIVEN_ID)
    second = enqueue(redis_client, message_id=GIVEN_ID)
    begin(store, first)
    deliver(store, first, ["a@example.org"])
    assert store.ledger(GIVEN_ID) == {"a@example.org"}
    ledger, _ = begin(store, second)
    assert ledger == {"a@example.org"}
    stored = store.load(first.send_id)
    assert stored is not None and store.never_again(stored) == {"a@example.org"}


def test_a_send_stored_in_the_earlier_layout_is_sent_from_its_legacy_source(
    redis_client: redis.Redis,
) -> None:
    """Queued before an upgrade: the mail at ``dispatch:source:<id>``."""
    store = SendStore(redis_client)
    rec = enqueue(redis_client)
    key = send_key(rec.send_id)
    source = redis_client.hget(key, "source")
    assert source is not None
    redis_client.hdel(key, "source")
    redis_client.set(legacy_source_key(rec.send_id), source)
    redis_client.sadd(ledger_key(rec.message_id), "b@example.org")
    old = store.load_whole(rec.send_id)
    assert old is not None and old.legacy_source and old.source is None

    ledger, legacy = begin(store, old)
    assert legacy == source and ledger == {"b@example.org"}
    deliver(store, old, ["a@example.org"])
    assert store.ledger(rec.message_id) == {"a@example.org", "b@example.org"}
    assert store.sweep_final(time.time() + RECORD_TTL + 1) == 1
    assert not redis_client.exists(key, legacy_source_key(rec.send_id))


def test_the_sweep_deletes_final_sends_past_retention_with_their_index_entries(
    redis_client: redis.Redis,
) -> None:
    store = SendStore(redis_client)
    now = time.time()
    old = enqueue(redis_client)
    begin(store, old)
    deliver(store, old, ["a@example.org", "b@example.org"], now=now - RECORD_TTL - 5)
    recent = enqueue(redis_client)
    begin(store, recent)
    deliver(store, recent, ["a@example.org", "b@example.org"], now=now - RECORD_TTL + 600)
    waiting = enqueue(redis_client)
    redis_client.zadd(state_key("queued", "default"), {waiting.send_id: now - RECORD_TTL - 5})  # not final
    assert redis_client.ttl(send_key(old.send_id)) == -1  # final records carry no TTL of their own

    assert store.sweep_final(now) == 1
    assert not redis_client.exists(send_key(old.send_id))
    assert store.ids_in_state(SendState.DELIVERED) == [recent.send_id]
    assert store.load(recent.send_id) is not None and store.load(waiting.send_id) is not None
    assert store.sweep_final(now) == 0


def test_the_sweep_goes_in_chunks_until_the_index_is_clear(redis_client: redis.Redis) -> None:
    store = SendStore(redis_client)
    recs = [enqueue(redis_client) for _ in range(7)]
    for rec in recs:
        begin(store, rec)
        rec.move(SendState.FAILED)
        store.record_outcome(rec, [], now=time.time() - RECORD_TTL - 5)
    assert store.sweep_final(time.time(), chunk=3, rounds=2) == 6
    assert store.count_states()[SendState.FAILED] == 1
    assert store.sweep_final(time.time(), chunk=3) == 1
    assert keys_like(redis_client, "dispatch:send:*") == []


def test_a_workers_maintenance_sweeps_sends_past_retention(
    redis_client: redis.Redis, smtp_server: Callable[..., RecordingSmtpServer],
    start_workers: Callable[..., WorkerRun],
) -> None:  # fmt: skip
    store = SendStore(redis_client)
    old = enqueue(redis_client)
    begin(store, old)
    deliver(store, old, ["a@example.org", "b@example.org"], now=time.time() - RECORD_TTL - 5)
    worker = start_workers(smtp_url(smtp_server().port), "--burst")
    assert worker.wait(timeout=30) == 0, worker.text()
    assert not redis_client.exists(send_key(old.send_id))
    swept = [e for e in worker.events() if e.get("event") == "records_swept"]
    assert [e.get("sends") for e in swept] == [1], worker.text()


def test_the_sweep_drops_a_stale_index_entry_but_never_a_live_record(redis_client: redis.Redis) -> None:
    """The review of the first sweep: an old entry in a final index whose record is no longer in that
    state (a stale outcome moved it on; a send id made again after its idempotency key expired) loses its
    entry, never its record."""
    store = SendStore(redis_client)
    live = enqueue(redis_client)
    old = time.time() - RECORD_TTL - 5
    redis_client.zadd(state_key("delivered", "default"), {live.send_id: old})
    redis_client.zadd(state_key("failed", "default"), {"mail-gone": old})
    assert store.sweep_final(time.time()) == 0
    assert store.load(live.send_id) is not None
    assert store.ids_in_state(SendState.QUEUED) == [live.send_id]
    assert store.ids_in_state(SendState.DELIVERED) == [] and store.ids_in_state(SendState.FAILED) == []


def test_a_dashboard_refresh_reads_each_leased_record_once(redis_client: redis.Redis) -> None:
    """The review of the first version: the overview counted ``sending`` once overall and once per queue,
    reading every leased record (and its mail summary) four times a refresh."""
    store = SendStore(redis_client)
    recs = [enqueue(redis_client, priority=p) for p in ("high", "default", "default", "bulk")]
    for rec in recs:
        begin(store, rec)
    legacy = recs[3]
    redis_client.hdel(send_key(legacy.send_id), "priority")  # written before the field: read from its mail
    redis_client.config_resetstat()
    shown = overview(redis_client)
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_hmget"]["calls"] == len(recs)
    assert stats["cmdstat_hget"]["calls"] == 1  # the one record without its priority field
    assert shown["states"]["sending"] == 4
    assert {q["name"]: q["states"]["sending"] for q in shown["queues"]} == {
        "mail-high": 1, "mail-default": 2, "mail-bulk": 1
    }
