"""Chaos: thousands of mails through ``worker.py --concurrency 4`` against a server that, seeded, drops
connections, answers 421 and 4xx at every stage. At the end every recipient is delivered exactly once
(counted by Message-ID and recipient at the server) or failed / unknown with a reason: zero lost, zero
duplicates outside "unknown".
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable

import redis
from helpers import wait_until
from retrykit import StartWorker, deliveries, env_for, mail, message_id_of, smtp_url, unanswered
from rq import Queue
from rq.serializers import JSONSerializer
from servers import Fault, ScriptedSmtpServer

from dispatcher.queue.producer import QUEUE_NAMES, Producer
from dispatcher.queue.states import FINAL_STATES
from dispatcher.queue.store import SendStore

Scripted = Callable[..., ScriptedSmtpServer]
MAILS = 2000
SEED = 20261127
BOUNCE = b"550 5.1.1 no such user\r\n"
# Always refused, with a hint to retry at once: their co-recipient is accepted in the same attempt, so the
# next attempt is due immediately (the ledger and that retry are written in one transaction); they end up
# exhausted.
GREY = b"450 4.7.1 greylisted, try again in 0 seconds\r\n"

# Per stage: (probability, fault) rolled in order each time the stage occurs. Left out, for quirks of the
# test server: 4xx instead of the 354 (it would go on reading message data) and 421 after the final dot
# (its message record then looks unanswered, like a drop); test_stage_policy covers both.
CHAOS: dict[str, list[tuple[float, Fault]]] = {
    "greeting": [(0.01, Fault("reply", b"421 4.3.2 too many connections\r\n"))],
    "mail": [
        (0.02, Fault("reply", b"421 4.3.2 closing channel\r\n")),
        (0.02, Fault("reply", b"451 4.3.0 local problem\r\n")),
        (0.01, Fault("drop")),
    ],
    "rcpt": [
        (0.04, Fault("reply", b"450 4.2.0 mailbox busy\r\n")),
        (0.01, Fault("reply", b"421 4.3.2 closing channel\r\n")),
        (0.01, Fault("drop")),
    ],
    "data": [(0.01, Fault("drop"))],
    "data_end": [(0.02, Fault("reply", b"451 4.3.0 queue full\r\n")), (0.01, Fault("drop"))],
}


class SeededFaults:
    """Stands in for ``ScriptedSmtpServer.faults``: every lookup of a stage rolls a seeded die."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.fired: Counter[str] = Counter()

    def get(self, stage: str, default: Fault | None = None) -> Fault | None:
        with self._lock:
            roll = self._rng.random()
        for chance, fault in CHAOS.get(stage, []):
            if roll < chance:
                with self._lock:
                    self.fired[f"{stage}:{fault.action}:{fault.payload[:3].decode()}"] += 1
                return fault
            roll -= chance
        return default


def recipients(i: int) -> list[str]:
    first = f"bounce{i}@d{i % 5}.test" if i % 97 == 0 else f"m{i}a@d{i % 5}.test"
    second = f"grey{i}@d{i % 3}.test" if i % 89 == 1 else f"m{i}b@d{i % 3}.test"
    return [first, second] if i % 2 else [first]


def explain(problems: list[str], store: SendStore, server: ScriptedSmtpServer) -> str:
    """The record and the server's view of the first few sends with a problem, to read what happened."""
    lines = []
    for send_id in list(dict.fromkeys(p.split()[0] for p in problems))[:3]:
        rec = store.load(send_id)
        assert rec is not None
        lines.append(f"{send_id}: {rec.state} outcomes={rec.outcomes} history={rec.status()['history']}")
        for message in server.messages:
            if message_id_of(message.data) == rec.message_id:
                record = server.records[message.connection_id - 1]
                lines.append(
                    f"  conn {message.connection_id} rcpts={message.rcpt_tos} final={message.final_reply!r}"
                    f" ended={record.ended} fault={record.fault_fired}"
                )
    return "\n".join(lines)


def test_chaos_every_recipient_delivered_once_or_failed_or_unknown_with_a_reason(
    scripted_server: Scripted, redis_url: str, redis_client: redis.Redis, start_worker: StartWorker
) -> None:
    bounces = {f"bounce{i}@d{i % 5}.test": BOUNCE for i in range(0, MAILS, 97)}
    greylisted = {f"grey{i}@d{i % 3}.test": GREY for i in range(1, MAILS, 89) if i % 2}
    server = scripted_server(per_recipient={**bounces, **greylisted})
    faults = SeededFaults(SEED)
    server.faults = faults  # type: ignore[assignment]
    sent = Producer(redis_client).enqueue_many(mail(recipients(i), f"chaos {i}") for i in range(MAILS))
    ids = {s.id: (s.message_id, recipients(i)) for i, s in enumerate(sent)}  # type: ignore[union-attr]
    assert len(ids) == MAILS

    started = time.monotonic()
    env = env_for(
        redis_url,
        smtp_url(server.port, timeout=5),
        DISPATCH_RETRY_BASE="0.05",
        DISPATCH_RETRY_MAX_DELAY="0.2",
        DISPATCH_RETRY_MAX_ATTEMPTS="8",
        DISPATCH_LOG_LEVEL="WARNING",
    )
    pool = start_worker(env, "--concurrency", "4")
    store = SendStore(redis_client)

    def finished() -> bool:
        pool.remember_descendants()
        counts = store.count_states()
        return sum(counts[s] for s in FINAL_STATES) >= MAILS

    wait_until(finished, 100, interval=0.5, message=f"not all sends final: {store.count_states()}")
    elapsed = time.monotonic() - started
    assert pool.stop() == 0

    accepted = deliveries(server.messages, only_final=b"250")
    maybe = unanswered(server.messages)
    expected = {(mid, rcpt) for mid, rcpts in ids.values() for rcpt in rcpts}
    assert set(accepted) | set(maybe) <= expected, "the server got mail nobody enqueued"
    states: Counter[str] = Counter()
    statuses: Counter[str] = Counter()
    attempts: Counter[int] = Counter()
    problems: list[str] = []
    for rec in store.load_many(ids):
        mid, rcpts = ids[rec.send_id]
        states[rec.state] += 1
        attempts[rec.attempts] += 1
        if rec.state != "delivered" and not rec.status().get("reason"):
            problems.append(f"{rec.send_id} {rec.state} without a reason")
        for rcpt in rcpts:
            outcome = rec.status()["recipients"].get(rcpt, {})
            status = outcome.get("status")
            statuses[str(status)] += 1
            got = (accepted[(mid, rcpt)], maybe[(mid, rcpt)])
            want = {"accepted": (1, 0), "unknown": (0, 1)}.get(str(status), (0, 0))
            if got != want:
                problems.append(f"{rec.send_id} {rcpt} {status}: server has {got}, expected {want}")
            if status != "accepted" and not (outcome.get("text") and outcome.get("kind")):
                problems.append(f"{rec.send_id} {rcpt} {status} without a reason: {outcome}")
    failed_jobs = sum(
        len(Queue(name, connection=redis_client, serializer=JSONSerializer).failed_job_registry)
        for name in QUEUE_NAMES
    )
    print(
        f"\nchaos: {MAILS} mails, {len(expected)} recipients in {elapsed:.1f} s; states {dict(states)}; "
        f"recipients {dict(statuses)}; attempts {dict(sorted(attempts.items()))}; "
        f"connections {server.connection_count}; "
        f"faults fired {sum(faults.fired.values())} "
        f"{dict(faults.fired)}"
    )
    assert not problems, f"{len(problems)} problems, e.g. {problems[:10]}\n" + explain(
        problems, store, server
    )
    assert sum(states.values()) == MAILS
    assert failed_jobs == 0, "rq jobs crashed"
    bounced = Counter(
        str(rec.status()["recipients"][r].get("status"))
        for rec in store.load_many(ids)
        for r in rec.outcomes
        if r in bounces
    )
    assert bounced["permanent"] + bounced["unknown"] == len(bounces), f"550 recipients: {dict(bounced)}"
    assert sum(faults.fired.values()) > MAILS // 20, "the server did not misbehave enough to prove much"
