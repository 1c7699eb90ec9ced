"""``enqueue.py retry``: a fresh budget, never a resend to ledger-accepted recipients, idempotent,
filters (--code, --domain, --since, --all) and --dry-run that changes nothing."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
import redis
from helpers import wait_until
from retrykit import (
    PYTHON,
    ROOT,
    StartWorker,
    cli_json,
    deliveries,
    env_for,
    load,
    mail,
    process_env,
    smtp_url,
    state_of,
    status,
)
from servers import RecordingSmtpServer, Rule

from dispatcher.queue.keys import ledger_key
from dispatcher.queue.producer import Producer

Sink = Callable[..., RecordingSmtpServer]
FINAL = ("delivered", "failed", "unknown")


def run_burst(start_worker: StartWorker, env: dict[str, str]) -> None:
    """A ``--burst`` worker: drains what is queued now, then exits by itself."""
    worker = start_worker(env, "--burst")
    try:
        code = worker.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("burst worker did not finish within 60 s") from None
    assert code == 0, worker.log_text()[-2000:]


def rcpt_count(sink: RecordingSmtpServer, address: str) -> int:
    return sum(address in line for _, line in sink.commands if line.upper().startswith("RCPT"))


def test_retry_gives_a_fresh_budget_and_skips_accepted_recipients(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    ok, busy = "ok@example.test", "busy@example.test"
    sink = smtp_server(rules={busy: Rule(450, "4.2.0 busy", times=3)})
    done = Producer(redis_client).enqueue(mail([ok, busy]))
    start_worker(env_for(redis_url, smtp_url(sink.port), DISPATCH_RETRY_MAX_ATTEMPTS="2"))
    wait_until(lambda: state_of(redis_client, done.id) in FINAL, 30, message="first run never ended")
    first = status(redis_url, done.id)
    assert (first["state"], first["attempts"], first["reason"]["kind"]) == ("failed", 2, "exhausted")

    results = cli_json(redis_url, "retry", done.id)["results"]
    assert results == {done.id: "queued: 1 recipient(s)"}
    # busy refuses a 3rd time: only a fresh budget (attempts back to 0) allows the attempt after that.
    wait_until(lambda: state_of(redis_client, done.id) in FINAL, 30, message="the retry never ended")
    shown = status(redis_url, done.id)
    assert (shown["state"], shown["generation"], shown["attempts"]) == ("delivered", 1, 2)
    counts = deliveries(sink.messages)
    assert counts[(done.message_id, ok)] == 1 and counts[(done.message_id, busy)] == 1
    assert rcpt_count(sink, ok) == 1, "the ledger-accepted recipient was sent to again"
    assert rcpt_count(sink, busy) == 4


def test_retry_skips_recipients_the_ledger_holds_even_if_the_record_says_failed(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    bounced = "bounced@example.test"
    sink = smtp_server(rules={bounced: Rule(550, "5.1.1 no such user")})
    done = Producer(redis_client).enqueue(mail([bounced]))
    run_burst(start_worker, env_for(redis_url, smtp_url(sink.port)))
    assert state_of(redis_client, done.id) == "failed"
    # The ledger is the authority: a recipient in it is never sent to again by any path.
    redis_client.sadd(ledger_key(done.message_id), bounced)
    for args in (["retry", done.id], ["retry", "--all"]):
        results = cli_json(redis_url, *args)["results"]
        assert results == {done.id: "skipped: every recipient already accepted"}
    assert load(redis_client, done.id).generation == 0


def test_retrying_the_same_send_twice_sends_once(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    ok, flaky = "ok@example.test", "flaky@example.test"
    sink = smtp_server(rules={flaky: Rule(550, "5.1.1 no such user (yet)", times=1)})
    done = Producer(redis_client).enqueue(mail([ok, flaky]))
    env = env_for(redis_url, smtp_url(sink.port))
    run_burst(start_worker, env)
    assert state_of(redis_client, done.id) == "failed"

    # Two operators at once, then one more by id and one by filter: exactly one retry is queued.
    racers = [
        subprocess.Popen(
            [PYTHON, "enqueue.py", "--redis-url", redis_url, "retry", done.id],
            cwd=ROOT,
            env=process_env({}),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=30) for racer in racers]
    assert all(racer.returncode == 0 for racer in racers), outputs
    again = cli_json(redis_url, "retry", done.id)["results"][done.id]
    by_filter = cli_json(redis_url, "retry", "--all")["results"]
    said = sorted([*(o[0] for o in outputs), again])
    assert sum("queued: 1 recipient(s)" in text for text in said) == 1, said
    assert again == "skipped: queued" and by_filter == {}
    assert load(redis_client, done.id).generation == 1

    run_burst(start_worker, env)
    shown = status(redis_url, done.id)
    assert shown["state"] == "delivered"
    assert cli_json(redis_url, "retry", done.id)["results"] == {done.id: "skipped: delivered"}
    counts = deliveries(sink.messages)
    assert counts[(done.message_id, ok)] == 1 and counts[(done.message_id, flaky)] == 1
    assert rcpt_count(sink, ok) == 1 and rcpt_count(sink, flaky) == 2


def snapshot(connection: redis.Redis) -> dict[bytes, Any]:
    """Every key with its type, value and whether it expires: what a dry run must leave alone."""
    found: dict[bytes, Any] = {}
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key).decode()
        value: Any
        if kind == "string":
            value = connection.get(key)
        elif kind == "hash":
            value = connection.hgetall(key)
        elif kind == "set":
            value = sorted(connection.smembers(key))
        elif kind == "zset":
            value = connection.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = connection.lrange(key, 0, -1)
        else:
            value = connection.xrange(key)
        found[key] = (kind, value, connection.ttl(key) > 0)
    return found


@pytest.fixture
def failures(
    smtp_server: Sink, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> tuple[dict[str, str], float, RecordingSmtpServer]:
    """Four failed sends in two batches (``--since`` tells them apart): their ids by name, the moment
    between the batches, the sink."""
    sink = smtp_server(
        rules={
            "x@alpha.test": Rule(550, "5.1.1 no such user"),
            "y@beta.test": Rule(451, "4.3.0 try later"),
            "z@alpha.test": Rule(552, "5.2.2 mailbox full"),
            "w@gamma.test": Rule(550, "5.1.1 no such user"),
        }
    )
    env = env_for(redis_url, smtp_url(sink.port), DISPATCH_RETRY_MAX_ATTEMPTS="1")
    producer = Producer(redis_client)
    ids = {
        name: producer.enqueue(mail([f"{name}@{domain}.test"])).id
        for name, domain in (("x", "alpha"), ("y", "beta"), ("z", "alpha"))
    }
    run_burst(start_worker, env)
    between = time.time()
    wait_until(lambda: time.time() > between + 0.01, 1)
    ids["w"] = producer.enqueue(mail(["w@gamma.test"])).id
    run_burst(start_worker, env)
    for send_id in ids.values():
        assert state_of(redis_client, send_id) == "failed"
    assert load(redis_client, ids["y"]).status()["reason"]["kind"] == "exhausted"
    return ids, between, sink


def test_filters_select_by_code_domain_and_since_and_dry_run_changes_nothing(
    failures: tuple[dict[str, str], float, RecordingSmtpServer], redis_url: str, redis_client: redis.Redis
) -> None:
    ids, between, _ = failures
    since_iso = datetime.fromtimestamp(between, UTC).isoformat().replace("+00:00", "Z")
    before = snapshot(redis_client)
    cases = {
        ("--code", "4xx"): {"y"},
        ("--code", "5xx"): {"x", "z", "w"},
        ("--code", "550"): {"x", "w"},
        ("--code", "5.2.2"): {"z"},
        ("--domain", "alpha.test"): {"x", "z"},
        ("--domain", "ALPHA.test", "--code", "5.1.1"): {"x"},
        ("--since", since_iso): {"w"},
        ("--since", "1h"): {"x", "y", "z", "w"},
        ("--all",): {"x", "y", "z", "w"},
    }
    for args, expected in cases.items():
        output = cli_json(redis_url, "retry", *args, "--dry-run")
        assert output["dry_run"] is True
        assert output["results"] == {ids[n]: "would retry 1 recipient(s)" for n in expected}, args
    assert snapshot(redis_client) == before, "a dry run changed Redis"


def test_filtered_retry_queues_only_the_matching_sends(
    failures: tuple[dict[str, str], float, RecordingSmtpServer],
    redis_url: str,
    redis_client: redis.Redis,
    start_worker: StartWorker,
) -> None:
    ids, _, sink = failures
    results = cli_json(redis_url, "retry", "--code", "4xx")["results"]
    assert results == {ids["y"]: "queued: 1 recipient(s)"}
    assert {n: load(redis_client, i).generation for n, i in ids.items()} == {"x": 0, "y": 1, "z": 0, "w": 0}
    assert state_of(redis_client, ids["y"]) == "queued"
    run_burst(start_worker, env_for(redis_url, smtp_url(sink.port), DISPATCH_RETRY_MAX_ATTEMPTS="1"))
    rec = load(redis_client, ids["y"])
    assert (rec.state, rec.generation, rec.attempts) == ("failed", 1, 1)
    assert rcpt_count(sink, "y@beta.test") == 2
    assert all(rcpt_count(sink, f"{n}@") == 1 for n in ("x", "z", "w"))
