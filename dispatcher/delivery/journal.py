"""The outcome journal: where an attempt's outcome waits when Redis stays away longer than its lease allows.

An outcome, once known, is never dropped (README "Guarantees", invariant 3). ``Attempt._commit`` first
tries the write again and again (backoff to 2 s) for half the send's lease: inside that time no other
worker may take the send, so a late write is always the truth. Past it, the lease may expire while Redis
is still down, and when Redis returns recovery settles the send on its own — *unknown* when its data may
have gone out (the ``data_out`` marker: never a resend), queued again when it had not. So the attempt
stops waiting and appends the outcome here, a local file, fsynced, and the job ends; every worker on the
host replays the journal when it starts and in each maintenance round, and an entry leaves the file only
once Redis has taken it (``replay``).

Replaying an entry (one WATCH/MULTI on the record):

* The record still shows that attempt (same generation and attempt number), ``sending`` or settled
  ``unknown`` by recovery meanwhile: the journaled outcome is written as the attempt would have — ledger,
  record, next attempt, lease dropped (``unknown → delivered|failed|deferred`` is the state table's edge
  for this). The truth replaces recovery's "may have been delivered".
* Anything else (an operator retried or deleted it, or recovery requeued it because its data had not gone
  out and a later attempt took over): only the recipients the entry saw accept go into the ledger — always
  a true fact, and what keeps a later attempt from sending to them again.

One file per worker process (``<worker name>.jsonl``), appended under ``flock``; a replayer takes the same
lock, so entries are neither read twice nor lost between a write and a rewrite.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import redis
import structlog

from dispatcher.errors import QueueUnavailable
from dispatcher.queue.producer import schedule_attempt
from dispatcher.queue.records import HistoryEntry, SendRecord
from dispatcher.queue.states import SendState
from dispatcher.queue.store import DECODE_ERRORS, OUTAGE, SendStore

logger = structlog.get_logger("dispatcher.delivery.journal")
SUFFIX = ".jsonl"


@dataclass(frozen=True, slots=True)
class Entry:
    """One attempt's outcome as ``Attempt._finish`` staged it."""

    send_id: str
    generation: int
    attempts: int
    job_id: str
    state: str
    record: dict[str, Any]
    """The record's JSON as the attempt staged it (``SendRecord.record_json``)."""
    accepted: list[str]
    next_job: tuple[str, float] | None
    at: float

    @classmethod
    def of(
        cls, rec: SendRecord, job_id: str, accepted: list[str], next_job: tuple[str, float] | None, at: float
    ) -> Entry:
        return cls(rec.send_id, rec.generation, rec.attempts, job_id, rec.state.value, rec.record_json(),
                   list(accepted), next_job, at)  # fmt: skip

    @classmethod
    def from_line(cls, line: str) -> Entry:
        data = json.loads(line)
        next_job = data.get("next_job")
        data["next_job"] = (str(next_job[0]), float(next_job[1])) if next_job else None
        return cls(**data)

    def to_line(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":")) + "\n"


class Journal:
    """The journal directory of this host's workers; ``name`` is this process's own file."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.path = directory / f"{name}{SUFFIX}"

    def append(self, entry: Entry) -> None:
        """Add ``entry`` durably (written and fsynced before this returns)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            with self._locked(self.path, "a") as handle:
                if os.fstat(handle.fileno()).st_nlink == 0:
                    continue  # a replayer emptied and removed the file between our open and our lock
                handle.write(entry.to_line())
                handle.flush()
                os.fsync(handle.fileno())
                break
        logger.warning("outcome_journaled", send_id=entry.send_id, attempt=entry.attempts,
                       state=entry.state, journal=str(self.path))  # fmt: skip

    def pending(self) -> int:
        """How many entries wait in every file of the directory."""
        return sum(len(_lines(path)) for path in self._files())

    def replay(self, connection: redis.Redis) -> int:
        """Write every entry of every file of the directory that Redis takes now; returns how many.
        An entry stays while Redis is away; a line that cannot be read is logged and dropped."""
        done = 0
        for path in self._files():
            try:
                done += self._replay_file(path, connection)
            except FileNotFoundError:  # another worker of this host replayed and removed it meanwhile
                continue
        return done

    def _replay_file(self, path: Path, connection: redis.Redis) -> int:
        done = 0
        with self._locked(path, "r+") as handle:
            if os.fstat(handle.fileno()).st_nlink == 0:
                return 0  # replayed and removed while we waited for the lock
            kept: list[str] = []
            for line in handle.read().splitlines():
                if not line.strip():
                    continue
                if kept:  # Redis went away on an earlier entry: keep the rest for the next round
                    kept.append(line)
                    continue
                try:
                    entry = Entry.from_line(line)
                except (ValueError, TypeError, KeyError, IndexError) as exc:
                    logger.error("journal_entry_unreadable", journal=str(path), error=str(exc))
                    continue
                try:
                    result = replay_entry(SendStore(connection), entry)
                except (QueueUnavailable, *OUTAGE):  # rq stages its enqueue outside the store
                    kept.append(line)
                    continue
                done += 1
                logger.info("outcome_replayed", send_id=entry.send_id, attempt=entry.attempts,
                            result=result)  # fmt: skip
            handle.seek(0)
            handle.truncate()
            if kept:
                handle.write("\n".join(kept) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            elif _same_file(path, handle):  # never a newer file a writer made at the same path
                path.unlink()
        return done

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob(f"*{SUFFIX}"))

    @staticmethod
    @contextlib.contextmanager
    def _locked(path: Path, mode: str) -> Iterator[IO[str]]:
        with open(path, mode, encoding="utf-8") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield handle
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _same_file(path: Path, handle: IO[str]) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False


def _lines(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except FileNotFoundError:
        return []


REPLAYABLE = (SendState.SENDING, SendState.UNKNOWN)


def replay_entry(store: SendStore, entry: Entry) -> str:
    """Write one journaled outcome (module docstring): ``"applied"``, ``"ledger"`` (only the accepted
    recipients were still news) or ``"missing"``. Atomic (WATCH on the record)."""
    with store.watching() as pipe:
        while True:
            try:
                store.watch_send(pipe, entry.send_id, leases=False)
                try:
                    rec = store.load(entry.send_id)
                except DECODE_ERRORS:
                    rec = None
                if rec is None:
                    pipe.reset()
                    return "missing"
                same = (rec.generation, rec.attempts) == (entry.generation, entry.attempts)
                pipe.multi()
                if not same or rec.state not in REPLAYABLE:
                    store.stage_ledger(pipe, rec.message_id, entry.accepted)
                    store.execute(pipe)
                    return "ledger"
                settled_as = rec.state.value
                target = SendState(entry.state)
                if rec.state is not target:
                    rec.move(target)
                rec.load_record_json(entry.record)
                rec.note(HistoryEntry(at=time.time(), event="outcome_replayed", attempt=entry.attempts,
                                      generation=entry.generation, details={"was": settled_as}))  # fmt: skip
                rec.data_out = None
                rec.next_attempt_at = None
                if entry.next_job is not None:
                    schedule_attempt(pipe, store.redis, rec, *entry.next_job)
                store.stage_outcome(pipe, rec, entry.accepted, now=time.time())
                store.execute(pipe)
                return "applied"
            except redis.WatchError:
                continue
