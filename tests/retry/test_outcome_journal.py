"""An outcome, once known, is never dropped — also when Redis stays away longer than the attempt may wait
(issue 13, invariant 3). Past half its lease the attempt journals the outcome to a local file
(``dispatcher.delivery.journal``); the worker replays it when Redis answers. Before the journal the write
was given up after half the lease: the send then ended *unknown* ("may have been delivered") although
the server had said 250 — the outcome the worker knew was dropped.

Real Redis servers stopped and started again (AOF), a real SMTP sink, real worker processes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import wait_until
from retrykit import StartWorker, deliveries, env_for, load, mail, smtp_url, state_of
from servers import Fault, RecordingSmtpServer, RedisServer, ScriptedSmtpServer

from dispatcher.delivery.attempt import Attempt
from dispatcher.delivery.journal import Entry, Journal, replay_entry
from dispatcher.queue.operations import Operations
from dispatcher.queue.producer import Producer
from dispatcher.queue.recovery import reap_abandoned
from dispatcher.queue.store import SendStore
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

Sink = Callable[..., RecordingSmtpServer]
Scripted = Callable[..., ScriptedSmtpServer]
MakeRedis = Callable[..., RedisServer]


def _journaled_attempt(
    server: RedisServer, sink: RecordingSmtpServer, journal_dir: Path, recipients: list[str]
) -> tuple[Runtime, Attempt, str, dict[str, Any]]:
    """One attempt whose Redis goes away right after the data-out marker, for longer than half the
    (2 s) lease: it ends by journaling its outcome. Returns with Redis stopped."""
    client = server.client()
    done = Producer(client).enqueue(mail(recipients))
    env = env_for(server.url, smtp_url(sink.port), DISPATCH_LEASE_SECONDS="2",
                  DISPATCH_JOURNAL_DIR=str(journal_dir))  # fmt: skip
    runtime = Runtime(load_settings(env, need_routes=True))

    class RedisGoesAwayWithTheDataOnTheWire(Attempt):
        def data_going_out(self) -> None:
            super().data_going_out()  # durable first: the marker is in Redis
            server.stop()

    result: dict[str, Any] = {}
    attempt = RedisGoesAwayWithTheDataOnTheWire(runtime, client, done.id, done.id)
    worker = threading.Thread(target=lambda: result.update(attempt.run()), daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), "the attempt kept waiting for Redis past half its lease"
    client.close()
    return runtime, attempt, done.id, result


def test_an_outcome_redis_cannot_take_in_half_a_lease_is_journaled_and_replayed_over_unknown(
    make_redis_server: MakeRedis, smtp_server: Sink, tmp_path: Path
) -> None:
    server = make_redis_server(appendonly=True)
    sink = smtp_server()
    runtime, attempt, send_id, result = _journaled_attempt(server, sink, tmp_path, ["kept@example.test"])
    try:
        assert attempt.journaled and result.get("state") == "delivered", result
        journal = runtime.journal()
        assert journal.pending() == 1
        assert len(sink.messages) == 1
        server.restart()
        client = server.client()
        # Meanwhile the lease expired: another worker's recovery finds data out and settles it unknown.
        rec = load(client, send_id)
        assert rec.state == "sending" and rec.data_out == 1
        reap_abandoned(client, now=time.time() + 60)
        assert state_of(client, send_id) == "unknown"

        assert journal.replay(client) == 1
        rec = load(client, send_id)
        assert rec.state == "delivered", rec.status().get("history")
        assert rec.status()["recipients"]["kept@example.test"]["status"] == "accepted"
        assert rec.status()["reason"] is None and rec.data_out is None
        assert rec.status()["history"][-1]["event"] == "outcome_replayed"
        assert rec.status()["history"][-1]["was"] == "unknown"
        assert SendStore(client).never_again(rec) == {"kept@example.test"}
        assert send_id not in SendStore(client).leased()
        assert journal.pending() == 0 and not list(tmp_path.rglob("*.jsonl"))
        assert journal.replay(client) == 0
        client.close()
    finally:
        runtime.close()


def test_a_journaled_outcome_for_a_send_retried_since_only_fills_the_ledger(
    make_redis_server: MakeRedis, smtp_server: Sink, tmp_path: Path
) -> None:
    server = make_redis_server(appendonly=True)
    sink = smtp_server()
    runtime, attempt, send_id, _ = _journaled_attempt(server, sink, tmp_path, ["a@example.test"])
    try:
        assert attempt.journaled
        server.restart()
        client = server.client()
        reap_abandoned(client, now=time.time() + 60)  # unknown ...
        assert Operations(client).retry([send_id])[send_id].startswith("queued")  # ... then retried
        assert runtime.journal().replay(client) == 1
        rec = load(client, send_id)
        assert rec.state == "queued" and rec.generation == 1  # the operator's retry stands
        # and its next attempt will not send to the recipient the journal saw accept
        assert SendStore(client).ledger(rec.message_id) == {"a@example.test"}
        client.close()
    finally:
        runtime.close()


def test_a_journal_entry_waits_while_redis_is_away_and_bad_lines_are_dropped(
    make_redis_server: MakeRedis, tmp_path: Path
) -> None:
    server = make_redis_server(appendonly=True)
    client = server.client()
    done = Producer(client).enqueue(mail(["w@example.test"]))
    journal = Journal(tmp_path, "w1")
    rec = load(client, done.id)
    journal.append(Entry.of(rec, done.id, ["w@example.test"], None, time.time()))
    (tmp_path / "w2.jsonl").write_text("{not json\n")
    server.stop()
    assert journal.replay(client) == 0
    assert journal.pending() == 1  # kept for the next round; the unreadable line is gone
    server.restart()
    assert replay_entry(SendStore(client), Entry.of(rec, "x", [], None, time.time())) == "ledger"
    assert journal.replay(client) == 1 and journal.pending() == 0
    client.close()


def test_a_worker_process_journals_when_redis_dies_before_the_reply_and_replays_when_it_returns(
    make_redis_server: MakeRedis, scripted_server: Scripted, start_worker: StartWorker, tmp_path: Path
) -> None:
    """Real processes: ``worker.py``; the server holds its 250 to the final dot while the test stops Redis,
    then answers. The worker cannot write for longer than half its lease, journals, and — once Redis is
    back — replays: delivered, once, and the journal empty. (Before: the outcome was given up, and the lone
    worker.py exited 1 when rq's loop ended on the outage, never to deliver again.)"""
    server = make_redis_server(appendonly=True)
    smtp = scripted_server(faults={"data_end": Fault("hold")}, faults_on_connection=1)
    client = server.client()
    done = Producer(client).enqueue(mail(["p@example.test", "q@example.test"]))
    client.close()
    journal_dir = tmp_path / "journal"
    env = env_for(server.url, smtp_url(smtp.port, timeout=60), DISPATCH_LEASE_SECONDS="2",
                  DISPATCH_JOURNAL_DIR=str(journal_dir))  # fmt: skip
    worker = start_worker(env)
    assert smtp.holding.wait(30), "the worker never reached the final dot"
    server.stop()
    smtp.release.set()
    wait_until(lambda: any(journal_dir.rglob("*.jsonl")), 30, message="the outcome was not journaled")
    server.restart()
    client = server.client()
    wait_until(lambda: state_of(client, done.id) == "delivered", 60, message="the journal was not replayed")
    wait_until(lambda: not any(journal_dir.rglob("*.jsonl")), 30, message="the journal was not emptied")
    rec = load(client, done.id)
    assert {rec.status_of(r) for r in ("p@example.test", "q@example.test")} == {"accepted"}
    assert SendStore(client).never_again(rec) == {"p@example.test", "q@example.test"}
    accepted = deliveries(smtp.messages, only_final=b"250")
    assert set(accepted.values()) == {1} and len(accepted) == 2
    assert len(smtp.messages) == 1, "the mail was sent again"
    # A lone worker.py (no supervisor) outlived the outage: rq's loop ended on it and was started again.
    assert worker.process.poll() is None
    client.close()
