"""A record that cannot be read (issue 14 item 4, issue 13 "a record with a corrupt field", invariant 5): it
is quarantined — state ``broken`` — the first time, with the reason "unreadable record: …", and never
requeued in a loop
(issue 14 saw ~1,000 rq jobs in 10 s for one send whose source was not UTF-8); the reaper and
``enqueue.py status`` handle it without a traceback. Real worker processes, a real Redis."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from helpers import wait_until
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

from dispatcher.queue.keys import INFLIGHT, send_key, state_key
from dispatcher.queue.producer import Producer
from dispatcher.queue.recovery import reap_abandoned
from dispatcher.queue.store import SendStore

StartWorkers = Callable[..., WorkerRun]
SmtpServer = Callable[..., RecordingSmtpServer]
RunCli = Callable[..., object]


def mail(n: int) -> dict[str, str]:
    return {"from": "app@example.com", "to": f"rcpt{n}@example.org", "subject": f"mail {n}", "text": "x"}


def rq_jobs_of(client: redis.Redis, send_id: str) -> list[bytes]:
    """Every rq job ever made for this send (attempt job ids start with the send id)."""
    return list(client.scan_iter(match=f"rq:job:{send_id}*"))


def stored_state(client: redis.Redis, send_id: str) -> bytes | None:
    return client.hget(send_key(send_id), "state")


def test_a_source_that_is_not_utf8_is_quarantined_once_with_its_reason_and_never_requeued(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    producer = Producer(redis_client)
    poison = producer.enqueue(mail(1)).id
    redis_client.hset(send_key(poison), "source", b'{"from": "\xff\xfe app@example.com"}')
    good = producer.enqueue(mail(2)).id
    worker = start_workers(smtp_url(sink.port))

    sink.wait_for_messages(1, timeout=30)

    def failed_without_a_loop() -> bool:
        assert len(rq_jobs_of(redis_client, poison)) <= 1, "the poison send is being requeued in a loop"
        return stored_state(redis_client, poison) == b"broken"

    wait_until(failed_without_a_loop, timeout=20, message=worker.text())
    rec = SendStore(redis_client).load(poison)
    assert rec is not None and rec.status()["reason"]["text"].startswith("unreadable record: ")
    assert "UTF-8" in rec.status()["reason"]["text"] or "utf-8" in rec.status()["reason"]["text"]
    assert len(rq_jobs_of(redis_client, poison)) == 1  # the one the producer made: no requeue ever
    assert not [h for h in rec.status().get("history", []) if h.get("event") == "batch_stopped"]
    assert redis_client.zscore(INFLIGHT, poison) is None
    wait_until(lambda: stored_state(redis_client, good) == b"delivered", timeout=10, message=worker.text())
    assert worker.proc.poll() is None


def test_a_record_hash_that_cannot_be_parsed_is_quarantined_by_the_worker_once(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    producer = Producer(redis_client)
    broken = producer.enqueue(mail(3)).id
    redis_client.hset(send_key(broken), "mail", b"\xff{ not json")
    producer.enqueue(mail(4))
    worker = start_workers(smtp_url(sink.port))

    sink.wait_for_messages(1, timeout=30)
    wait_until(lambda: stored_state(redis_client, broken) == b"broken", timeout=20, message=worker.text())
    assert SendStore(redis_client).ids_in_state("broken") == [broken]
    assert broken not in SendStore(redis_client).ids_in_state("queued")
    assert redis_client.zscore(INFLIGHT, broken) is None
    assert len(rq_jobs_of(redis_client, broken)) == 1
    assert not [line for line in worker.raw_lines() if "Traceback" in line], worker.text()
    assert any(e.get("event") == "mail_unreadable" and e.get("send_id") == broken for e in worker.events())


def test_the_reaper_quarantines_an_expired_unreadable_record_once_without_an_error(
    redis_client: redis.Redis,
) -> None:
    broken = Producer(redis_client).enqueue(mail(5)).id
    redis_client.hset(send_key(broken), mapping={"state": "sending", "record": b"\xff not json"})
    redis_client.zadd(INFLIGHT, {broken: time.time() - 1})  # its worker died: the lease expired

    assert reap_abandoned(redis_client) == []
    assert redis_client.zscore(INFLIGHT, broken) is None  # not looked at again every round
    assert stored_state(redis_client, broken) == b"broken"
    assert redis_client.zscore(state_key("broken", "default"), broken) is not None
    assert b"unreadable record" in (redis_client.hget(send_key(broken), "record") or b"")
    assert reap_abandoned(redis_client) == []


def test_status_of_an_unreadable_record_is_a_clear_error_not_a_traceback(
    redis_client: redis.Redis, run_cli: Callable[..., object]
) -> None:
    broken = Producer(redis_client).enqueue(mail(6)).id
    redis_client.hset(send_key(broken), "mail", b"\xff{ not json")

    done = run_cli("status", broken)
    assert "Traceback" not in done.stderr, done.stderr  # type: ignore[attr-defined]
    assert f"send {broken!r}" in done.stderr and "unreadable record" in done.stderr  # type: ignore[attr-defined]
    assert "state queued" in done.stderr  # type: ignore[attr-defined]
    assert done.returncode == 4  # type: ignore[attr-defined]
