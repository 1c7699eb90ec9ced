"""The send store: the one owner of a send's Redis keys (``queue.keys``) — records (the mail in them),
idempotency keys, the ledger, the state indexes and in-flight leases (who is alive is
``queue.presence``'s).

rq jobs only carry a send id; the record is the source of truth for state, attempts and every
recipient's outcome, so retries, the CLI and the dashboard never depend on rq's registries or pickles.
No other module names one of these keys: they ask ``SendStore`` to read them, or to stage writes on a
MULTI pipeline that also carries rq's enqueue (one transaction for record, ledger, lease and schedule).
An attempt's begin and its outcome are one Lua script each (``queue.scripts``): one command a mail
instead of a MULTI of a dozen (issue 15); an outcome that schedules a next attempt runs its script inside
the MULTI that carries rq's schedule.

Redis being unreachable is mapped here, at this one boundary, to ``QueueUnavailable`` (as
``smtp.connection`` maps OS errors): ``SendStore.execute`` for staged transactions, and every method that
talks to Redis itself.

Invariants the store's writes keep (README "Guarantees"):

1. A send that is not final has one owner: its queued or scheduled rq job, or a worker's lease in
   ``dispatch:inflight`` (``begin_attempt`` leases it in the same script that moves it to ``sending`` —
   and only if the record still names the job and state the attempt read, so a job the reconciler
   replaced can never take it back; ``record_outcome`` / ``stage_outcome`` drop the lease in the script
   that records the outcome, or the outcome waits in the worker's journal, ``delivery.journal``, until
   Redis takes it). A live attempt's outcome script takes the lease away first, and one whose lease is
   gone writes its outcome only while the record still shows its attempt (else only the ledger).
2. ``data_out`` (``mark_data_out``) is durable before the first byte of an attempt's message data is
   written; recovery then settles the send *unknown*, never resends it.
3. A recipient in the ledger is never sent to again: the outcome's script adds the accepted ones in the
   same atomic call as the record that says so. The ledger is per Message-ID, not per send: every send
   of a Message-ID reads it at its begin (the app may enqueue a message again with the id it was given).
4. Retention: final records carry no TTL; ``sweep_final`` deletes them ``RECORD_TTL`` after their last
   update together with their index entries (atomic with an operator's retry, which moves the entry).

The key layout keeps an attempt's cost to Redis low (issue 15, ``tests/test_command_budget``): the mail in
the record (no source key), one index per state and priority and none for ``sending`` (the in-flight set
is its index), no per-minute counters (``delivered_per_minute`` counts the delivered index) and no TTL
writes on records. Every reader but an attempt loads a record without its mail (``load``).

An attempt's own calls (read the record, begin, mark the data out, record the outcome) go through
``SendStore.for_attempts``: this thread's store, sending them on a connection it holds
(``queue.held``) instead of taking one from the pool around every command.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, ParamSpec, TypeVar

import redis
from redis.commands.core import Script

from dispatcher.errors import QueueUnavailable
from dispatcher.mail.fields import PRIORITIES
from dispatcher.queue.held import HeldConnection
from dispatcher.queue.keys import (
    INFLIGHT,
    KEY_TTL,
    LEDGER_TTL,
    RECORD_TTL,
    UNSORTED,
    idempotency_key,
    ledger_key,
    legacy_source_key,
    send_key,
    state_key,
)
from dispatcher.queue.records import SUMMARY_FIELDS, DeliveryStatus, SendRecord, text
from dispatcher.queue.scripts import BEGIN_ATTEMPT, RECORD_OUTCOME, SWEEP_FINAL
from dispatcher.queue.states import FINAL_STATES, SendState

DECODE_ERRORS = (ValueError, KeyError, TypeError, AttributeError)
"""What decoding a bad record hash raises (``UnicodeDecodeError``, ``JSONDecodeError`` are ValueErrors;
KeyError for a missing field; an unknown state is a ValueError of ``SendState``)."""
STATES = tuple(SendState)
BUCKETS = (*PRIORITIES, UNSORTED)
"""Every state's index is one sorted set per bucket: a priority, or ``UNSORTED``."""
INDEXED_STATES: tuple[SendState, ...] = tuple(s for s in SendState if s is not SendState.SENDING)
"""The states with an index of their own: ``sending``'s is the in-flight set (invariant 1 below keeps
every sending record leased), so an attempt moves its send between indexes twice, not four times."""
_SUMMARY_KEYS = tuple(f.encode() for f in SUMMARY_FIELDS)
OUTAGE = (redis.ConnectionError, redis.TimeoutError)
"""What redis-py raises when Redis cannot be reached, does not answer in time, or is still loading its
data after a restart (``BusyLoadingError`` is a ``ConnectionError``): the one definition of an outage."""

P = ParamSpec("P")
R = TypeVar("R")


def unavailable(exc: BaseException) -> QueueUnavailable:
    """The ``QueueUnavailable`` for a redis-py outage error (its cause is kept)."""
    what = "timed out" if isinstance(exc, redis.TimeoutError) else "is unreachable"
    error = QueueUnavailable(f"Redis {what}: {exc}")
    error.__cause__ = exc
    return error


def outage_is_unavailable(method: Callable[P, R]) -> Callable[P, R]:
    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except OUTAGE as exc:
            raise unavailable(exc) from exc

    return wrapper


class SendStore:
    """Reads and writes send records; every state change moves the id between the state indexes.

    Methods named ``stage_*`` queue their writes on a MULTI pipeline the caller executes with ``execute``
    (together with rq's enqueue of the next job); the others talk to Redis themselves."""

    def __init__(self, connection: redis.Redis, *, hold: bool = False) -> None:
        self.redis = connection
        self._begin = connection.register_script(BEGIN_ATTEMPT)
        self._outcome = connection.register_script(RECORD_OUTCOME)
        self._sweep = connection.register_script(SWEEP_FINAL)
        self.held = HeldConnection(connection) if hold else None
        """With ``hold``: the connection the attempt calls go over (``queue.held``)."""

    @classmethod
    def for_attempts(cls, connection: redis.Redis) -> SendStore:
        """This thread's store for delivery attempts on ``connection``'s pool: ``load``,
        ``begin_attempt``, ``mark_data_out`` and ``record_outcome`` on a connection it holds. One per
        thread (lanes run in threads; each has its own); a store for another pool replaces it, giving
        the old one's connection back."""
        kept: SendStore | None = getattr(_THREAD_STORES, "store", None)
        if kept is None or kept.redis.connection_pool is not connection.connection_pool:
            if kept is not None and kept.held is not None:
                kept.held.close()
            kept = _THREAD_STORES.store = cls(connection, hold=True)
        return kept

    def _call(self, *args: Any) -> Any:
        if self.held is not None:
            return self.held.call(*args)
        return self.redis.execute_command(*args)  # type: ignore[no-untyped-call]

    def _script(self, script: Script, keys: list[str], args: list[Any]) -> Any:
        if self.held is not None:
            return self.held.script(script, keys, args)
        return script(keys=keys, args=args)

    # -- transactions -------------------------------------------------------------------------------

    def transaction(self) -> Any:
        """A MULTI pipeline, ``multi()`` already called (explicitly, before rq sees the pipeline: its
        enqueue calls ``multi()`` when it is not)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.multi()
        return pipe

    def watching(self) -> Any:
        """A pipeline for an optimistic transaction: ``watch_send`` on it, read, then ``multi()``."""
        return self.redis.pipeline(transaction=True)

    @outage_is_unavailable
    def watch_send(self, pipe: Any, send_id: str, *, leases: bool = True) -> None:
        """WATCH ``send_id``'s record (and, with ``leases``, the in-flight set) on ``pipe``."""
        keys = [send_key(send_id), INFLIGHT] if leases else [send_key(send_id)]
        pipe.watch(*keys)

    @staticmethod
    def execute(pipe: Any) -> list[Any]:
        """Execute a staged transaction; an outage is ``QueueUnavailable`` (``WatchError`` passes)."""
        try:
            result: list[Any] = pipe.execute()
        except OUTAGE as exc:
            raise unavailable(exc) from exc
        return result

    # -- reads ----------------------------------------------------------------------------------------

    @outage_is_unavailable
    def load(self, send_id: str) -> SendRecord | None:
        """The record without the mail itself (``raw`` and ``source`` None): what every reader but an
        attempt needs — a retry of a send with big attachments moves no attachment."""
        raw = _summary(self._call("HMGET", send_key(send_id), *SUMMARY_FIELDS))
        return SendRecord.from_hash(send_id, raw) if raw else None

    @outage_is_unavailable
    def load_whole(self, send_id: str) -> SendRecord | None:
        """The record with the mail itself: what an attempt sends."""
        raw = self._call("HGETALL", send_key(send_id))
        return SendRecord.from_hash(send_id, raw) if raw else None

    @outage_is_unavailable
    def load_raw(self, send_id: str) -> dict[bytes, bytes]:
        """The record's hash as stored, undecoded (empty when there is none): for records too broken
        to decode."""
        raw: dict[bytes, bytes] = self.redis.hgetall(send_key(send_id))  # type: ignore[assignment]
        return raw

    def _summaries(self, ids: list[str]) -> list[dict[bytes, bytes]]:
        """Each of ``ids``' record hashes without the mail itself (one round trip): what a listing
        needs, without the attachments; an empty dict for a send that does not exist."""
        pipe = self.redis.pipeline(transaction=False)
        for send_id in ids:
            pipe.hmget(send_key(send_id), SUMMARY_FIELDS)
        return [_summary(values) for values in pipe.execute()]

    @outage_is_unavailable
    def load_many_tolerant(
        self, send_ids: Iterable[str]
    ) -> tuple[list[SendRecord], list[tuple[str, BaseException]]]:
        """The records of ``send_ids`` that exist (one round trip, without the mail itself: ``raw`` and
        ``source`` are None), each decoded on its own: those that cannot be decoded come back apart
        with what was wrong, so one bad hash breaks no listing."""
        ids = list(send_ids)
        readable: list[SendRecord] = []
        unreadable: list[tuple[str, BaseException]] = []
        for send_id, raw in zip(ids, self._summaries(ids), strict=True):
            if not raw:
                continue
            try:
                readable.append(SendRecord.from_hash(send_id, raw))
            except DECODE_ERRORS as exc:
                unreadable.append((send_id, exc))
        return readable, unreadable

    @outage_is_unavailable
    def load_many(self, send_ids: Iterable[str]) -> list[SendRecord]:
        """The records of ``send_ids`` that exist, without the mail itself (``load_many_tolerant``)."""
        ids = list(send_ids)
        return [SendRecord.from_hash(i, raw) for i, raw in zip(ids, self._summaries(ids), strict=True) if raw]

    @outage_is_unavailable
    def ledger(self, message_id: str) -> set[str]:
        return {text(m) for m in self.redis.smembers(ledger_key(message_id))}

    @outage_is_unavailable
    def ids_in_state(self, state: str, *, since: float | None = None, limit: int | None = None) -> list[str]:
        """Ids of the sends in ``state`` updated since ``since``, newest first (every priority's)."""
        low: float | str = since if since is not None else "-inf"
        if state == SendState.SENDING:  # newest lease first: a lease's score is its expiry, a fixed time
            return [i for i, _ in self._leased_sending(low)][:limit]  # after its attempt began or refreshed
        return self._indexed(state, low, "+inf", limit, newest_first=True)

    @outage_is_unavailable
    def waiting_since(self, states: Iterable[SendState], before: float, limit: int) -> list[str]:
        """Ids of sends in ``states`` not updated since ``before``, oldest first, at most ``limit`` each."""
        found: list[str] = []
        for state in states:
            found.extend(self._indexed(state, "-inf", before, limit, newest_first=False))
        return found

    def _indexed(
        self, state: str, low: float | str, high: float | str, limit: int | None, *, newest_first: bool
    ) -> list[str]:
        """Ids in ``state``'s indexes (every bucket's, merged by score) scored from ``low`` to ``high``."""
        start, num = (0, limit) if limit is not None else (None, None)
        pipe = self.redis.pipeline(transaction=False)
        for bucket in BUCKETS:
            key = state_key(state, bucket)
            if newest_first:
                pipe.zrevrangebyscore(key, high, low, start=start, num=num, withscores=True)
            else:
                pipe.zrangebyscore(key, low, high, start=start, num=num, withscores=True)
        entries = itertools.chain.from_iterable(pipe.execute())
        merged = sorted(entries, key=lambda pair: float(pair[1]), reverse=newest_first)
        return [text(i) for i, _ in merged[:limit]]

    def _leased_sending(self, low: float | str = "-inf") -> list[tuple[str, bytes | None]]:
        """The leased sends (lease expiring from ``low`` on, newest first) whose record is ``sending``,
        each with its record's ``priority`` field (None for a record written before that field)."""
        leased = [text(i) for i in self.redis.zrevrangebyscore(INFLIGHT, "+inf", low)]
        pipe = self.redis.pipeline(transaction=False)
        for send_id in leased:
            pipe.hmget(send_key(send_id), "state", "priority")
        found = zip(leased, pipe.execute(), strict=True)
        return [(i, priority) for i, (state, priority) in found if state == b"sending"]

    @outage_is_unavailable
    def count_states(self, priority: str | None = None) -> dict[str, int]:
        """Sends per state, over every queue or in one priority's."""
        per_bucket = self.counts_per_priority()
        buckets = BUCKETS if priority is None else (_bucket(priority),)
        return {state: sum(per_bucket[b][state] for b in buckets) for state in STATES}

    @outage_is_unavailable
    def counts_per_priority(self) -> dict[str, dict[str, int]]:
        """Sends per state in each bucket (``BUCKETS``), in one pass: the ZCARDs of the indexes, and for
        ``sending`` the leased sends whose record is ``sending``, each read once (its ``priority`` field;
        the mail summary only for a record written before that field)."""
        pipe = self.redis.pipeline(transaction=False)
        for bucket in BUCKETS:
            for state in INDEXED_STATES:
                pipe.zcard(state_key(state, bucket))
        sizes = iter(pipe.execute())
        sending = dict.fromkeys(BUCKETS, 0)
        for priority in self._sending_priorities():
            sending[_bucket(priority)] += 1
        counts: dict[str, dict[str, int]] = {}
        for bucket in BUCKETS:
            row = {state: int(next(sizes)) for state in INDEXED_STATES}
            row[SendState.SENDING] = sending[bucket]
            counts[bucket] = {state: row[state] for state in STATES}
        return counts

    def _sending_priorities(self) -> list[str | None]:
        """The priority of each leased send whose record is ``sending``."""
        sending = self._leased_sending()
        older = [i for i, p in sending if p is None]
        pipe = self.redis.pipeline(transaction=False)
        for send_id in older:
            pipe.hget(send_key(send_id), "mail")
        mails = dict(zip(older, pipe.execute(), strict=True)) if older else {}
        return [text(p) if p is not None else _priority_in(mails.get(i)) for i, p in sending]

    @outage_is_unavailable
    def delivered_per_minute(self, minutes: int = 60, *, now: float | None = None) -> list[tuple[int, int]]:
        """Deliveries in each of the last ``minutes`` minutes (the delivered index, by delivery time)."""
        current = int((now or time.time()) // 60)
        span = range(current - minutes + 1, current + 1)
        pipe = self.redis.pipeline(transaction=False)
        for minute in span:
            for bucket in BUCKETS:
                pipe.zcount(state_key(SendState.DELIVERED, bucket), minute * 60, f"({(minute + 1) * 60}")
        counts = iter(pipe.execute())
        return [(m * 60, sum(next(counts) for _ in BUCKETS)) for m in span]

    # -- creating sends -------------------------------------------------------------------------------

    @outage_is_unavailable
    def watch_idempotency(self, pipe: Any, keys: Iterable[str]) -> dict[str, str]:
        """WATCH the idempotency keys ``keys`` (as producers give them) on ``pipe`` and read them: each
        one already claimed maps to what its claim holds (``"<send id> <fingerprint>"``)."""
        stored = {key: idempotency_key(key) for key in keys}
        if not stored:
            return {}
        watched = sorted(set(stored.values()))
        pipe.watch(*watched)
        values = dict(zip(watched, pipe.mget(watched), strict=True))
        return {key: text(values[k]) for key, k in stored.items() if values[k] is not None}

    def stage_claim(self, pipe: Any, key: str, send_id: str, fingerprint: str) -> None:
        """Queue the write that makes idempotency key ``key`` name ``send_id`` (and its mail's print)."""
        pipe.set(idempotency_key(key), f"{send_id} {fingerprint}", ex=KEY_TTL)

    def stage_new(self, pipe: Any, recs: list[SendRecord], *, now: float) -> None:
        """Queue the writes creating ``recs`` on ``pipe``: a hash each (the mail in it), and their
        state-index entries in as few commands as possible (bulk enqueue is bounded by Redis commands)."""
        if not recs:
            return
        indexes: dict[str, dict[str, float]] = {}
        for rec in recs:
            rec.updated_at = now
            rec.stored_state = rec.state
            fields = itertools.chain.from_iterable(rec.to_hash_new().items())
            pipe.execute_command("HSET", send_key(rec.send_id), *fields)  # hset(mapping=) without its copy
            if rec.state is not SendState.SENDING:
                indexes.setdefault(state_key(rec.state, _bucket(rec.priority)), {})[rec.send_id] = now
        for key, members in indexes.items():
            pipe.zadd(key, members)

    # -- saving ---------------------------------------------------------------------------------------

    def stage_save(self, pipe: Any, rec: SendRecord, *, now: float | None = None) -> None:
        """Queue the writes that persist ``rec`` and its state index on ``pipe`` (a MULTI pipeline). A
        record saved as ``sending`` gets no index entry: the caller's lease is its index."""
        rec.updated_at = now or time.time()
        key = send_key(rec.send_id)
        pipe.hset(key, mapping=rec.to_hash())
        if rec.stored_state in FINAL_STATES and rec.state not in FINAL_STATES:  # a TTL of an older version
            pipe.persist(key)
            if rec.legacy_source:
                pipe.persist(legacy_source_key(rec.send_id))
        bucket = _bucket(rec.priority)
        before = rec.stored_state
        if before is not None and before != rec.state and before is not SendState.SENDING:
            pipe.zrem(state_key(before, bucket), rec.send_id)
        if rec.state is not SendState.SENDING:
            pipe.zadd(state_key(rec.state, bucket), {rec.send_id: rec.updated_at})
        rec.stored_state = rec.state

    def stage_fields(
        self, pipe: Any, send_id: str, fields: Mapping[str, str], *, moved: tuple[SendState, SendState],
        priority: str | None, now: float,
    ) -> None:  # fmt: skip
        """Queue a write of some fields of a record that cannot be decoded as a whole, and its move
        between the state indexes: out of every bucket's (its own may be what is unreadable), into
        ``priority``'s (``UNSORTED`` when it is not known)."""
        before, after = moved
        pipe.hset(send_key(send_id), mapping=dict(fields))
        if before is not SendState.SENDING:
            for bucket in BUCKETS:
                pipe.zrem(state_key(before, bucket), send_id)
        if after is not SendState.SENDING:
            pipe.zadd(state_key(after, _bucket(priority)), {send_id: now})

    def stage_delete(self, pipe: Any, rec: SendRecord, states: Iterable[SendState]) -> None:
        """Queue the removal of ``rec``: hash, ledger, lease and entries in ``states``' indexes."""
        pipe.delete(send_key(rec.send_id), legacy_source_key(rec.send_id))
        for state in states:
            if state is not SendState.SENDING:
                pipe.zrem(state_key(state, _bucket(rec.priority)), rec.send_id)
        pipe.zrem(INFLIGHT, rec.send_id)
        pipe.delete(ledger_key(rec.message_id))

    # -- attempts -------------------------------------------------------------------------------------

    @outage_is_unavailable
    def begin_attempt(
        self, rec: SendRecord, *, now: float, lease_seconds: float
    ) -> tuple[set[str], bytes | None] | None:
        """Save ``rec`` (moved to ``sending`` by the caller) under a lease of ``lease_seconds``, and read
        its ledger (casefolded) and, for a send enqueued before the mail moved into its record, the
        stored mail from its old key (None otherwise: ``rec.source`` holds it) — in one script, and
        only if the stored record still names the job and state ``rec`` was loaded with. None when it
        does not: the send moved on meanwhile (the reconciler gave it another job while this worker was
        stalled; an operator retried it) and whoever owns it now sends it, not this attempt."""
        if rec.stored_state is None or rec.stored_state.final or rec.stored_state is SendState.SENDING:
            raise ValueError(f"an attempt begins from a waiting state, not {rec.stored_state}")
        rec.updated_at = now
        fields = [item for pair in rec.to_hash().items() for item in pair]
        legacy = rec.legacy_source
        result = self._script(
            self._begin,
            keys=[send_key(rec.send_id), ledger_key(rec.message_id), legacy_source_key(rec.send_id), INFLIGHT,
                  state_key(rec.stored_state, _bucket(rec.priority))],
            args=[rec.rq_job or "", rec.stored_state.value, rec.send_id, now + lease_seconds,
                  "1" if legacy else "", *fields],
        )  # fmt: skip
        if result is None:
            return None
        rec.stored_state = rec.state
        members, source = result
        return {text(m).casefold() for m in members}, source

    @outage_is_unavailable
    def mark_data_out(self, send_id: str, attempt: int) -> None:
        """Record, before the first byte of its data is sent, that ``attempt`` may deliver the message.
        One round trip; it raises (and so no data goes out) when Redis does not acknowledge it."""
        self._call("HSET", send_key(send_id), "data_out", str(attempt))

    @outage_is_unavailable
    def record_outcome(
        self, rec: SendRecord, accepted: Sequence[str], *, now: float, live: bool = False
    ) -> bool:
        """Write an attempt's outcome in one script (``queue.scripts.RECORD_OUTCOME``): ``accepted``
        recipients (casefolded) into the ledger, the record and its move between the state indexes, and
        the lease dropped. ``live``: the attempt that holds the lease writes it — when the lease is gone
        and the record moved on to another attempt, only the ledger is written and False comes back
        (the script's docstring has every case)."""
        keys, args = self._outcome_call(rec, accepted, now, live)
        written = bool(self._script(self._outcome, keys, args))
        rec.stored_state = rec.state
        return written

    def stage_outcome(
        self, pipe: Any, rec: SendRecord, accepted: Sequence[str], *, now: float, live: bool = False
    ) -> None:
        """Queue ``record_outcome``'s script on a MULTI ``pipe`` (with rq's schedule of the next attempt,
        or a replay's WATCH); its reply, last of the transaction's, says whether the record took it. Sent
        whole (EVAL, which Redis caches by its digest too), not by digest: an EVALSHA that Redis forgot
        would fail alone inside the MULTI while rq's part of it applied, and redis-py's guard against that
        costs a SCRIPT EXISTS round trip before every such transaction."""
        keys, args = self._outcome_call(rec, accepted, now, live)
        pipe.eval(RECORD_OUTCOME, len(keys), *keys, *args)
        rec.stored_state = rec.state

    def _outcome_call(
        self, rec: SendRecord, accepted: Sequence[str], now: float, live: bool
    ) -> tuple[list[str], list[str | float | int]]:
        if rec.state is SendState.SENDING:
            raise ValueError("an outcome moves a send out of sending")
        rec.updated_at = now
        before = rec.stored_state if rec.stored_state is not None else rec.state
        persist = rec.stored_state in FINAL_STATES and rec.state not in FINAL_STATES
        bucket = _bucket(rec.priority)
        legacy = rec.legacy_source
        leaves = before is not SendState.SENDING and before != rec.state
        fields = [item for pair in rec.to_hash().items() for item in pair]
        keys = [send_key(rec.send_id), ledger_key(rec.message_id), INFLIGHT, state_key(before, bucket),
                state_key(rec.state, bucket), legacy_source_key(rec.send_id),
                state_key(SendState.UNKNOWN, bucket)]  # fmt: skip
        args: list[str | float | int] = [
            rec.send_id, rec.updated_at, "1" if persist else "", LEDGER_TTL, "1" if legacy else "",
            "1" if leaves else "", "1" if live else "", str(rec.generation), str(rec.attempts),
            rec.state.value, len(accepted), *accepted, *fields,
        ]  # fmt: skip
        return keys, args

    @staticmethod
    def stage_ledger(pipe: Any, message_id: str, accepted: Sequence[str]) -> None:
        """Queue adding ``accepted`` recipients (casefolded) to the ledger of ``message_id``."""
        if accepted:
            pipe.sadd(ledger_key(message_id), *accepted)
            pipe.expire(ledger_key(message_id), LEDGER_TTL)

    def never_again(self, rec: SendRecord) -> set[str]:
        """The recipients (casefolded) ``rec`` is never sent to again: its Message-ID's ledger's, and
        those its record shows accepted."""
        accepted = {r.casefold() for r, o in rec.outcomes.items() if o.status is DeliveryStatus.ACCEPTED}
        return accepted | {m.casefold() for m in self.ledger(rec.message_id)}

    @outage_is_unavailable
    def sweep_final(self, now: float, *, chunk: int = 500, rounds: int = 20) -> int:
        """Delete the final sends last updated ``RECORD_TTL`` ago or more — record, legacy source, index
        entry, in one script per chunk (``queue.scripts.SWEEP_FINAL``) — up to ``rounds`` chunks per
        index; how many went. Final records carry no TTL of their own: this is their retention, and
        it keeps the indexes from holding ids whose records are gone."""
        cutoff = now - RECORD_TTL
        prefixes = [send_key(""), legacy_source_key("")]
        swept = 0
        for state in FINAL_STATES:
            for bucket in BUCKETS:
                key = state_key(state, bucket)
                for _ in range(rounds):
                    deleted, removed = self._sweep(keys=[key], args=[cutoff, chunk, *prefixes, state.value])
                    swept += int(deleted)
                    if int(removed) < chunk:
                        break
        return swept

    # -- leases ---------------------------------------------------------------------------------------

    @outage_is_unavailable
    def lease(self, send_ids: Iterable[str], until: float, *, refresh: bool = False) -> None:
        """Lease ``send_ids`` until ``until``; ``refresh`` only extends leases that still exist (a send
        whose outcome was recorded meanwhile is not brought back)."""
        self.redis.zadd(INFLIGHT, dict.fromkeys(send_ids, until), xx=refresh)

    @staticmethod
    def stage_lease(pipe: Any, send_ids: Iterable[str], until: float) -> None:
        """Queue leasing ``send_ids`` until ``until`` (a worker adopting their job, ``worker.adoption``)."""
        pipe.zadd(INFLIGHT, dict.fromkeys(send_ids, until))

    @staticmethod
    def stage_release(pipe: Any, send_id: str) -> None:
        pipe.zrem(INFLIGHT, send_id)

    @outage_is_unavailable
    def leased(self) -> set[str]:
        """Every send id under a lease now, expired or not."""
        return {text(i) for i in self.redis.zrange(INFLIGHT, 0, -1)}

    @outage_is_unavailable
    def expired_leases(self, now: float) -> list[str]:
        return [text(m) for m in self.redis.zrangebyscore(INFLIGHT, "-inf", now)]

    @staticmethod
    def is_leased(pipe: Any, send_id: str) -> bool:
        """On a pipeline in WATCH mode (immediate): whether ``send_id`` is under a lease."""
        return pipe.zscore(INFLIGHT, send_id) is not None


def _summary(values: Sequence[bytes | None]) -> dict[bytes, bytes]:
    """An HMGET of ``SUMMARY_FIELDS`` as the hash it read (fields the record lacks left out)."""
    return {k: v for k, v in zip(_SUMMARY_KEYS, values, strict=True) if v is not None}


def _bucket(priority: str | None) -> str:
    """The index bucket of a send of ``priority``."""
    return priority if priority in PRIORITIES else UNSORTED


def _priority_in(mail: bytes | None) -> str | None:
    """The priority in a record's stored ``mail`` JSON (None when it cannot be read)."""
    try:
        priority = json.loads(mail or b"null").get("priority", "default")
    except (ValueError, AttributeError):
        return None
    return priority if isinstance(priority, str) else None


_THREAD_STORES = threading.local()
"""Each thread's ``SendStore.for_attempts`` store."""


def _forget_thread_stores() -> None:
    """In a forked child: a held connection is the parent's socket, never to be used here."""
    global _THREAD_STORES
    _THREAD_STORES = threading.local()


os.register_at_fork(after_in_child=_forget_thread_stores)
