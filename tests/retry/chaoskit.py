"""The rig of the chaos and Redis restart tests (issue 13): seeded SMTP faults, seeded ``kill -9`` of pool
children, and the tally that holds every recipient's record against what the server received.

The tally counts at the server by (Message-ID, recipient): a copy is a message whose data arrived and was
answered 250, or whose data arrived and was never answered (a drop or a killed client after the final
dot: the server may count it as delivered). Per recipient, by the record's final outcome:

    accepted            exactly one copy, answered 250          0 copies: lost · more: duplicated
    unknown             at most one copy                        more: duplicated
    permanent/transient no copy                                 a copy: delivered but recorded failed
    anything else       (the send is not final)                 lost
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis
from retrykit import WorkerProcess, deliveries, mail, message_id_of, unanswered
from rq import Queue
from rq.serializers import JSONSerializer
from servers import Fault, ScriptedSmtpServer

from dispatcher.errors import QueueUnavailable
from dispatcher.queue.producer import QUEUE_NAMES
from dispatcher.queue.states import FINAL_STATES
from dispatcher.queue.store import SendStore

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
    """Stands in for ``ScriptedSmtpServer.faults``: every lookup of a stage rolls a seeded die on
    ``table``. ``latency`` seconds pass before each reply to the final dot (a slow server keeps mail in
    flight, so a restart or an outage strikes sends in every stage)."""

    def __init__(
        self, seed: int, table: Mapping[str, list[tuple[float, Fault]]] = CHAOS, latency: float = 0.0
    ) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.table = table
        self.latency = latency
        self.fired: Counter[str] = Counter()

    def get(self, stage: str, default: Fault | None = None) -> Fault | None:
        if stage == "data_end" and self.latency:
            time.sleep(self.latency)  # the server's own processing time, in its connection's thread
        with self._lock:
            roll = self._rng.random()
        for chance, fault in self.table.get(stage, []):
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


def refusals(count: int) -> tuple[dict[str, bytes], dict[str, bytes]]:
    """The recipients of ``count`` chaos mails the server always refuses: (550 ones, 450 ones)."""
    bounces = {f"bounce{i}@d{i % 5}.test": BOUNCE for i in range(0, count, 97)}
    greylisted = {f"grey{i}@d{i % 3}.test": GREY for i in range(1, count, 89) if i % 2}
    return bounces, greylisted


def chaos_mails(count: int, tag: str = "chaos") -> list[dict[str, Any]]:
    return [mail(recipients(i), f"{tag} {i}") for i in range(count)]


class Killer:
    """``kill -9`` of a random child of a ``worker.py`` pool every ``uniform(*every)`` seconds (seeded),
    in a thread, until ``stop()``. ``kills`` holds the pids it killed."""

    def __init__(self, pool: WorkerProcess, seed: int, every: tuple[float, float] = (2.0, 4.0)) -> None:
        self.pool, self.every = pool, every
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self.kills: list[int] = []
        self._thread = threading.Thread(target=self._run, name="killer", daemon=True)

    def start(self) -> Killer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._rng.uniform(*self.every)):
            children = self.pool.children()
            if not children:
                continue
            pid = self._rng.choice(children)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            self.kills.append(pid)


@dataclass
class Tally:
    """Every enqueued recipient held against the server's copies (see the module docstring)."""

    mails: int
    recipients: int = 0
    delivered: int = 0
    unknown: int = 0
    unknown_with_a_copy: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    recorded_wrong: int = 0
    states: Counter[str] = field(default_factory=Counter)
    attempts: Counter[int] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> str:
        return (
            f"lost {self.lost}, duplicated {self.duplicated}, unknown {self.unknown} "
            f"({self.unknown_with_a_copy} of them reached the server), failed {self.failed}, "
            f"delivered {self.delivered}, recorded wrong {self.recorded_wrong} "
            f"({self.mails} mails, {self.recipients} recipients)"
        )


def tally(store: SendStore, server: ScriptedSmtpServer, ids: Mapping[str, tuple[str, list[str]]]) -> Tally:
    """``ids``: send id → (Message-ID, recipients) of everything enqueued."""
    accepted = deliveries(server.messages, only_final=b"250")
    maybe = unanswered(server.messages)
    expected = {(mid, rcpt.lower()) for mid, rcpts in ids.values() for rcpt in rcpts}
    result = Tally(mails=len(ids), recipients=len(expected))
    strays = (set(accepted) | set(maybe)) - expected
    if strays:
        result.problems.append(f"the server got mail nobody enqueued: {sorted(strays)[:5]}")
    found = {rec.send_id: rec for rec in store.load_many(ids)}
    for send_id, (mid, rcpts) in ids.items():
        rec = found.get(send_id)
        state = rec.state if rec is not None else "missing"
        result.states[str(state)] += 1
        if rec is not None:
            result.attempts[rec.attempts] += 1
        final = rec is not None and rec.state in FINAL_STATES
        if final and rec is not None and rec.state != "delivered" and not rec.reason:
            result.problems.append(f"{send_id} {rec.state} without a reason")
        for rcpt in rcpts:
            key = (mid, rcpt.lower())
            ok, unanswered_copies = accepted[key], maybe[key]
            copies = ok + unanswered_copies
            outcome = rec.status()["recipients"].get(rcpt, {}) if rec is not None and final else {}
            status = str(outcome.get("status"))
            seen = f"{send_id} {rcpt} {state}/{status}: server has {ok} answered 250"
            seen += f", {unanswered_copies} unanswered"
            if status == "accepted":
                if copies == 0:
                    result.lost += 1
                    result.problems.append(f"lost (recorded accepted): {seen}")
                elif copies > 1:
                    result.duplicated += 1
                    result.duplicates.append(key)
                    result.problems.append(f"duplicated: {seen}")
                elif ok != 1:
                    result.recorded_wrong += 1
                    result.problems.append(f"recorded accepted, never answered: {seen}")
                else:
                    result.delivered += 1
            elif status == "unknown":
                result.unknown += 1
                result.unknown_with_a_copy += copies > 0
                if copies > 1:
                    result.duplicated += 1
                    result.duplicates.append(key)
                    result.problems.append(f"duplicated: {seen}")
            elif status in ("permanent", "transient"):
                result.failed += 1
                if copies:
                    result.recorded_wrong += 1
                    result.problems.append(f"recorded failed, but the server has it: {seen}")
            else:
                result.lost += 1
                result.problems.append(f"lost (not final): {seen}")
            if final and status != "accepted" and not (outcome.get("text") and outcome.get("kind")):
                result.problems.append(f"{send_id} {rcpt} {status} without a reason: {outcome}")
    return result


def explain(problems: list[str], store: SendStore, server: ScriptedSmtpServer) -> str:
    """The record and the server's view of the first few sends with a problem, to read what happened."""
    lines = []
    for send_id in list(dict.fromkeys(p.split(": ", 1)[-1].split()[0] for p in problems))[:3]:
        rec = store.load(send_id) if send_id.startswith("mail-") else None
        if rec is None:
            continue
        lines.append(f"{send_id}: {rec.state} outcomes={rec.outcomes} history={rec.status()['history']}")
        for message in server.messages:
            if message_id_of(message.data) == rec.message_id:
                record = server.records[message.connection_id - 1]
                lines.append(
                    f"  conn {message.connection_id} at {message.at:.3f} rcpts={message.rcpt_tos}"
                    f" final={message.final_reply!r} ended={record.ended} fault={record.fault_fired}"
                )
    return "\n".join(lines)


def enqueued(sent: Iterable[Any], mails: list[dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    """send id → (Message-ID, recipients) from ``Producer.enqueue_many``'s answer for ``mails``."""
    return {s.id: (s.message_id, list(m["to"])) for s, m in zip(sent, mails, strict=True)}


def finished(store: SendStore, count: int) -> bool:
    """At least ``count`` sends are final; False while Redis does not answer (restarting, away)."""
    try:
        counts = store.count_states()
    except (redis.ConnectionError, QueueUnavailable):
        return False
    return sum(counts[s] for s in FINAL_STATES) >= count


def events(log_text: str, name: str) -> list[dict[str, Any]]:
    """The structlog events called ``name`` in a worker's JSON log."""
    found = []
    for line in log_text.splitlines():
        if f'"{name}"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def crashed_jobs(connection: redis.Redis) -> list[str]:
    """Why each job in rq's failed registries failed, except the ones abandoned by a killed worker."""
    reasons = []
    for name in QUEUE_NAMES:
        queue = Queue(name, connection=connection, serializer=JSONSerializer)
        for job in queue.failed_job_registry.get_job_ids():
            fetched = queue.fetch_job(job)
            info = (fetched.exc_info or "") if fetched is not None else ""
            if "AbandonedJobError" not in info:
                reasons.append(f"{job}: {info[-300:]}")
    return reasons
