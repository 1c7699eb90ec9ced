"""What operators do to sends that did not go out: find them, group them by reason, retry, delete.

One implementation for ``enqueue.py retry``, the dashboard and the HTTP API, so all three mean the same:
a retry gives a fresh attempt budget, sends only to recipients that are not in the ledger and did not
accept, and is idempotent — a send already queued again is left alone, so retrying twice sends once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis
import structlog

from dispatcher.errors import ConfigurationError
from dispatcher.queue.producer import attempt_job_id, schedule_attempt
from dispatcher.queue.records import DeliveryStatus, HistoryEntry, Reason, SendRecord
from dispatcher.queue.states import FAILURE_STATES, RETRYABLE_STATES, SendState
from dispatcher.queue.store import SendStore

logger = structlog.get_logger("dispatcher.queue.operations")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CLASS = re.compile(r"[245]xx")
_CODE = re.compile(r"[245]\d\d")


@dataclass(frozen=True, slots=True)
class FailureFilter:
    """Which failures an operation applies to. ``code``: ``4xx``, ``421`` or an enhanced ``5.1.1``."""

    code: str | None = None
    domain: str | None = None
    since: float | None = None
    states: tuple[str, ...] = FAILURE_STATES
    group: str | None = None

    def __post_init__(self) -> None:
        if self.code is not None and not (
            _CLASS.fullmatch(self.code) or _CODE.fullmatch(self.code) or _ENHANCED.fullmatch(self.code)
        ):
            raise ConfigurationError(f"code filter {self.code!r}: expected e.g. 4xx, 421 or 5.1.1")
        unknown = set(self.states) - set(RETRYABLE_STATES)
        if unknown:
            raise ConfigurationError(f"state filter {sorted(unknown)}: expected some of {RETRYABLE_STATES}")

    def matches(self, rec: SendRecord) -> bool:
        reason = rec.reason
        if self.code is not None:
            code = str(reason.code or "") if reason is not None else ""
            enhanced = str(reason.enhanced or "") if reason is not None else ""
            if _CLASS.fullmatch(self.code):
                if not code.startswith(self.code[0]):
                    return False
            elif _CODE.fullmatch(self.code):
                if code != self.code:
                    return False
            elif enhanced != self.code:
                return False
        if self.domain is not None and self.domain.lower() not in failed_domains(rec):
            return False
        return self.group is None or group_key(rec) == self.group


def failed_domains(rec: SendRecord) -> set[str]:
    return {
        recipient.rpartition("@")[2].lower()
        for recipient, outcome in rec.outcomes.items()
        if outcome.status is not DeliveryStatus.ACCEPTED
    }


def group_key(rec: SendRecord) -> str:
    """The reason a failure is grouped under: stage, reply code, enhanced code, recipient domain."""
    reason = rec.reason or Reason(kind="-", text="")
    domains = ",".join(sorted(failed_domains(rec))) or "-"
    parts = [rec.state, reason.kind or "-", reason.stage or "-", str(reason.code or "-"),
             reason.enhanced or "-", domains]  # fmt: skip
    return "|".join(parts)


def describe_group(key: str) -> dict[str, str]:
    state, kind, stage, code, enhanced, domains = key.split("|", 5)
    return {
        "state": state,
        "kind": kind,
        "stage": stage,
        "code": code,
        "enhanced": enhanced,
        "domains": domains,
    }


class Operations:
    def __init__(self, connection: redis.Redis) -> None:
        self.redis = connection
        self.store = SendStore(connection)

    def find(self, flt: FailureFilter, *, limit: int = 10_000) -> list[SendRecord]:
        """Sends in the filter's states matching it, newest first."""
        found: list[SendRecord] = []
        for state in flt.states:
            ids = self.store.ids_in_state(state, since=flt.since, limit=limit)
            found.extend(rec for rec in self.store.load_many(ids) if flt.matches(rec))
        found.sort(key=lambda rec: rec.updated_at, reverse=True)
        return found[:limit]

    def groups(self, flt: FailureFilter | None = None) -> list[dict[str, Any]]:
        """Failures grouped by reason with counts, largest group first."""
        groups: dict[str, dict[str, Any]] = {}
        for rec in self.find(flt or FailureFilter()):
            key = group_key(rec)
            group = groups.setdefault(key, {"key": key, **describe_group(key), "count": 0, "sample": None})
            group["count"] += 1
            if group["sample"] is None:
                group["sample"] = rec.reason.text if rec.reason is not None else None
        return sorted(groups.values(), key=lambda g: (-g["count"], g["key"]))

    def retry(self, send_ids: Iterable[str], *, dry_run: bool = False) -> dict[str, str]:
        """Queue each send again with a fresh budget; returns what happened to each id."""
        return {send_id: self._retry_one(send_id, dry_run) for send_id in dict.fromkeys(send_ids)}

    def _retry_one(self, send_id: str, dry_run: bool) -> str:
        with self.store.watching() as pipe:
            while True:
                try:
                    self.store.watch_send(pipe, send_id, leases=False)
                    rec = self.store.load(send_id)
                    if rec is None:
                        return "not found"
                    if rec.state not in RETRYABLE_STATES:
                        return f"skipped: {rec.state}"
                    never = self.store.never_again(rec)
                    pending = [r for r in rec.outcomes if r.casefold() not in never]
                    if not pending:
                        return "skipped: every recipient already accepted"
                    if dry_run:
                        return f"would retry {len(pending)} recipient(s)"
                    self._stage_retry(pipe, rec, pending)
                    self.store.execute(pipe)
                    logger.info("mail_retry_requested", send_id=send_id, generation=rec.generation,
                                recipients=pending)  # fmt: skip
                    return f"queued: {len(pending)} recipient(s)"
                except redis.WatchError:
                    continue

    def _stage_retry(self, pipe: Any, rec: SendRecord, pending: list[str]) -> None:
        now = time.time()
        rec.generation += 1
        rec.attempts = 0
        rec.move(SendState.QUEUED)
        rec.first_attempt_at = None
        for recipient in pending:
            rec.outcomes[recipient] = rec.outcomes[recipient].pending_again()
        rec.note(HistoryEntry(at=now, event="retry_requested", generation=rec.generation))
        pipe.multi()
        schedule_attempt(pipe, self.redis, rec, attempt_job_id(rec.send_id, rec.generation, 1), None)
        self.store.stage_save(pipe, rec, now=now)

    def delete(self, send_ids: Iterable[str]) -> dict[str, str]:
        """Forget sends that are not in flight (their rq jobs, if any, find no record and do nothing)."""
        done: dict[str, str] = {}
        for send_id in dict.fromkeys(send_ids):
            rec = self.store.load(send_id)
            if rec is None:
                done[send_id] = "not found"
                continue
            if rec.state is SendState.SENDING:
                done[send_id] = "skipped: sending"
                continue
            pipe = self.store.transaction()
            self.store.stage_delete(pipe, rec, (rec.state, *RETRYABLE_STATES))
            self.store.execute(pipe)
            done[send_id] = "deleted"
        return done
