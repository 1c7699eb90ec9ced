"""A mail to more than 100 recipients through the queue and a real worker: several SMTP transactions of
at most 100 (RFC 5321 §4.5.3.1.8), every recipient in the ledger once, alone or in a streamed batch."""

from __future__ import annotations

from collections.abc import Callable

import redis
from helpers import wait_until
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

from dispatcher.queue.producer import Producer
from dispatcher.queue.store import SendStore

SmtpServer = Callable[..., RecordingSmtpServer]
StartWorkers = Callable[..., WorkerRun]


def big(count: int, tag: str = "r") -> dict[str, object]:
    return {"from": "app@example.com", "to": "list@example.org", "subject": f"to {count}", "text": "x",
            "bcc": [f"{tag}{i}@example.org" for i in range(count - 1)]}  # fmt: skip


def test_a_mail_to_250_goes_in_three_transactions_and_each_recipient_once(
    redis_client: redis.Redis, smtp_server: SmtpServer, start_workers: StartWorkers
) -> None:
    sink = smtp_server()
    producer = Producer(redis_client)
    small = {"from": "app@example.com", "to": "one@example.org", "subject": "small", "text": "x"}
    ids = [done.id for done in producer.enqueue_many([small, big(250), small])]  # one streamed batch
    worker = start_workers(smtp_url(sink.port))
    store = SendStore(redis_client)
    wait_until(
        lambda: all(store.load(i).state == "delivered" for i in ids), timeout=30, message=worker.text()
    )
    sizes = sorted(len(m.rcpt_tos) for m in sink.messages)
    assert sizes == [1, 1, 50, 100, 100], sizes
    rec = store.load(ids[1])
    assert rec is not None and len(rec.outcomes) == 250
    assert {o.status for o in rec.outcomes.values()} == {"accepted"}
    assert len(store.never_again(rec)) == 250  # its record is its ledger (a generated Message-ID)
    delivered = [r for m in sink.messages if m.data.count(b"Subject: to 250") for r in m.rcpt_tos]
    assert sorted(delivered) == sorted(rec.recipients)
