"""Send records for the pages and the API, read so that one record that cannot be decoded breaks nothing.

A record hash can go bad — bytes that are not UTF-8, a ``mail`` that is not JSON, a state this version
does not know (a hand edit, another writer, an older or newer dispatcher). ``SendRecord.from_hash`` then
raises, and a listing that decodes every record would answer 500 to everyone. Here each record is
decoded on its own: the unreadable ones are skipped, logged once per request as
``dashboard_unreadable_record``, and shown as ``unreadable record <id>: <reason>``; actions on them
answer that instead of acting.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import structlog

from dispatcher.queue.operations import FailureFilter, Operations
from dispatcher.queue.records import SendRecord
from dispatcher.queue.states import SendState
from dispatcher.queue.store import DECODE_ERRORS, SendStore

logger = structlog.get_logger("dispatcher.dashboard.records")
_MAX_REASON = 200


@dataclass(frozen=True, slots=True)
class Unreadable:
    send_id: str
    reason: str

    def __str__(self) -> str:
        return f"unreadable record {self.send_id}: {self.reason}"


def reason_of(exc: BaseException) -> str:
    if isinstance(exc, KeyError):
        return f"field {exc} is missing"
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_REASON else text[: _MAX_REASON - 1] + "…"


def load_many(store: SendStore, send_ids: Iterable[str]) -> tuple[list[SendRecord], list[Unreadable]]:
    """The records of ``send_ids`` that exist (one round trip), split into readable and unreadable."""
    readable, failures = store.load_many_tolerant(send_ids)
    unreadable = [Unreadable(send_id, reason_of(exc)) for send_id, exc in failures]
    for bad in unreadable:
        logger.warning("dashboard_unreadable_record", send_id=bad.send_id, reason=bad.reason)
    return readable, unreadable


def load(store: SendStore, send_id: str) -> SendRecord | Unreadable | None:
    readable, unreadable = load_many(store, [send_id])
    return readable[0] if readable else unreadable[0] if unreadable else None


def find(
    store: SendStore, flt: FailureFilter, *, limit: int = 10_000
) -> tuple[list[SendRecord], list[Unreadable]]:
    """``Operations.find`` (the filter's states, matching, newest first), skipping unreadable records;
    the quarantined ones (``broken``) come with them, each with the reason it was quarantined for."""
    found: list[SendRecord] = []
    unreadable: list[Unreadable] = []
    for state in flt.states:
        readable, bad = load_many(store, store.ids_in_state(state, since=flt.since, limit=limit))
        found.extend(rec for rec in readable if flt.matches(rec))
        unreadable.extend(bad)
    quarantined, bad = load_many(store, store.ids_in_state(SendState.BROKEN, since=flt.since, limit=limit))
    unreadable.extend(Unreadable(rec.send_id, _quarantine_reason(rec)) for rec in quarantined)
    unreadable.extend(bad)
    found.sort(key=lambda rec: rec.updated_at, reverse=True)
    return found[:limit], unreadable


def _quarantine_reason(rec: SendRecord) -> str:
    text = rec.reason.text if rec.reason is not None and rec.reason.text else "quarantined"
    return text.removeprefix("unreadable record: ")


def act(
    operations: Operations, action: str, send_ids: Iterable[str], *, dry_run: bool = False
) -> dict[str, str]:
    """``Operations.retry`` / ``delete`` one id at a time, so an unreadable record answers for itself."""
    results: dict[str, str] = {}
    for send_id in dict.fromkeys(send_ids):
        try:
            if action == "retry":
                results.update(operations.retry([send_id], dry_run=dry_run))
            else:
                results.update(operations.delete([send_id]))
        except DECODE_ERRORS:
            bad = load(operations.store, send_id)
            if not isinstance(bad, Unreadable):
                raise  # not the record's fault: a real error
            results[send_id] = str(bad)
    return results
