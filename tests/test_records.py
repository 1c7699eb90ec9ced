"""The typed record (``dispatcher.queue.records``): the stored JSON decodes into typed outcomes, reason and
history, and encodes back to the same JSON; a value of the wrong shape makes the record unreadable."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from dispatcher.mail.mime import validated
from dispatcher.queue.records import (
    PENDING,
    DeliveryStatus,
    HistoryEntry,
    Reason,
    RecipientRecord,
    SendRecord,
    compact_json,
    mail_summary,
    new_send_id,
    tree_json,
)
from dispatcher.queue.states import SendState
from dispatcher.queue.store import DECODE_ERRORS

STORED = {
    "outcomes": {
        "a@x.org": {"status": "accepted", "stage": "data_end", "code": 250, "enhanced": "2.0.0",
                    "text": "ok", "kind": "recipient", "at": 1.5},
        "b@x.org": {"status": "pending"},
    },
    "history": [
        {"attempt": 1, "generation": 0, "at": 1.5, "ms": 3.2, "conn_id": "c1", "worker": "w",
         "job_id": "j", "outcomes": {"a@x.org": "accepted"}, "reply": None},
        {"attempt": 1, "generation": 0, "at": 2.0, "event": "reconciled", "lost_job": "j0"},
    ],
    "reason": {"kind": "recipient", "stage": "rcpt", "code": 550, "enhanced": "5.1.1", "text": "550 no"},
    "last_reply": {"code": 550, "enhanced": "5.1.1", "lines": ["no"]},
    "transcript": [{"stage": "mail", "command": "MAIL FROM:<a@x.org>"}],
    "first_attempt_at": 1.0,
    "delivered_via": "backup",
    "written_by_a_newer_version": [1, 2],
}  # fmt: skip


def _hash(record: object) -> dict[bytes, bytes]:
    mail = {"message_id": "<m@x>", "envelope": {"sender": "s@x.org", "recipients": ["a@x.org", "b@x.org"]}}
    return {b"mail": json.dumps(mail).encode(), b"state": b"deferred", b"record": json.dumps(record).encode()}


def test_the_stored_record_decodes_typed_and_encodes_back_to_the_same_json() -> None:
    rec = SendRecord.from_hash("s1", _hash(STORED))
    assert rec.outcomes["a@x.org"] == RecipientRecord(
        DeliveryStatus.ACCEPTED, "data_end", 250, "2.0.0", "ok", "recipient", 1.5
    )
    assert rec.status_of("b@x.org") is DeliveryStatus.PENDING and rec.status_of("nobody@x.org").open
    assert rec.reason == Reason(kind="recipient", text="550 no", stage="rcpt", code=550, enhanced="5.1.1")
    assert rec.history[1] == HistoryEntry(at=2.0, event="reconciled", attempt=1, generation=0,
                                          details={"lost_job": "j0"})  # fmt: skip
    assert (rec.first_attempt_at, rec.delivered_via) == (1.0, "backup")
    assert rec.record_json() == STORED
    assert json.loads(rec.to_hash()["record"]) == STORED


def test_a_new_record_has_pending_recipients_and_no_reason() -> None:
    rec = SendRecord("s2", {"message_id": "<m@x>"}, SendState.QUEUED, outcomes={"a@x.org": RecipientRecord()})
    pending = {"a@x.org": {"status": "pending"}}
    assert rec.record_json() == {"outcomes": pending, "history": [], "reason": None}


def test_history_keeps_the_newest_fifty() -> None:
    rec = SendRecord("s3", {"message_id": "<m@x>"}, SendState.QUEUED)
    for n in range(60):
        rec.note(HistoryEntry(at=float(n), event="e"))
    assert [h.at for h in rec.history] == [float(n) for n in range(10, 60)]


@pytest.mark.parametrize(
    "record",
    [
        [],  # not an object
        {"outcomes": []},
        {"outcomes": {"a@x.org": "accepted"}},
        {"outcomes": {"a@x.org": {"status": "delivered-ish"}}},
        {"outcomes": {"a@x.org": {"status": "accepted", "code": "250"}}},
        {"history": {"at": 1}},
        {"history": [{"at": 1, "outcomes": ["a"]}]},
        {"reason": "550 no"},
        {"last_reply": "550"},
    ],
    ids=repr,
)
def test_a_record_of_the_wrong_shape_is_unreadable(record: object) -> None:
    with pytest.raises(DECODE_ERRORS):
        SendRecord.from_hash("s4", _hash(record))


def test_an_operator_retry_keeps_the_last_reply_for_reference() -> None:
    refused = RecipientRecord(DeliveryStatus.PERMANENT, "rcpt", 550, "5.1.1", "no such user", "user", 3.0)
    again = refused.pending_again()
    assert again.status is DeliveryStatus.PENDING and (again.code, again.text) == (550, "no such user")


def test_a_send_id_without_key_is_a_uuid4_in_hex() -> None:
    ids = {new_send_id(None) for _ in range(200)}
    assert len(ids) == 200
    for send_id in ids:
        prefix, _, hex_id = send_id.partition("-")
        parsed = uuid.UUID(hex_id)
        assert (prefix, parsed.version, parsed.variant, parsed.hex) == ("mail", 4, uuid.RFC_4122, hex_id)


TREES = [
    {"from": "Zoë <z@x.org>", "to": ["a@x.org", '"Lee, Ann" <ann@x.org>'],
     "subject": "Grüße \u2028 \"q\" \\ \t", "text": "line\n" * 20, "headers": {"X-A": "1"},
     "metadata": {"n": 1, "f": 1.5, "big": 1e300, "neg": -0.0, "t": True, "none": None, "nan": float("nan"),
                  "inf": float("-inf")},
     "attachments": [{"size": 3}], "envelope": {"sender": "z@x.org", "recipients": ["a@x.org", "ann@x.org"]},
     "emoji": "\U0001f600"},
    [], {}, "plain", 7, None, [[], {}, [{}]], {"\udce9": "lone surrogate key", "v": "\ud800"},
]  # fmt: skip


@pytest.mark.parametrize("value", TREES, ids=repr)
def test_tree_json_writes_the_text_compact_json_writes(value: object) -> None:
    assert tree_json(value) == compact_json(value) == json.dumps(value, separators=(",", ":"))


def test_tree_json_refuses_what_compact_json_refuses() -> None:
    with pytest.raises(TypeError):
        compact_json({"x": object()})
    with pytest.raises(TypeError):
        tree_json({"x": object()})


NEW_RECORDS = [
    {"outcomes": {}},
    {"outcomes": {"a@x.org": PENDING}},
    {"outcomes": {"a@x.org": RecipientRecord(), "zoë@bücher.example": PENDING, '"q\\"x"@x.org': PENDING}},
    {"outcomes": {"a@x.org": RecipientRecord(DeliveryStatus.PENDING, "rcpt", 450, None, "later", "u", 1.0)}},
    {"outcomes": {"a@x.org": RecipientRecord(DeliveryStatus.ACCEPTED)}},
    {"outcomes": {"a@x.org": PENDING}, "history": [HistoryEntry(at=1.0, event="retry_requested")]},
    {"outcomes": {"a@x.org": PENDING}, "reason": Reason(kind="message", text="no")},
    {"outcomes": {"a@x.org": PENDING}, "last_reply": {"code": 250}},
    {"outcomes": {"a@x.org": PENDING}, "transcript": [{"stage": "mail"}]},
    {"outcomes": {"a@x.org": PENDING}, "first_attempt_at": 2.0},
    {"outcomes": {"a@x.org": PENDING}, "delivered_via": "backup"},
    {"outcomes": {"a@x.org": PENDING}, "extra": {"written_by_a_newer_version": 1}},
]  # fmt: skip


@pytest.mark.parametrize("fields", NEW_RECORDS, ids=repr)
def test_a_new_records_json_is_the_text_of_its_record_json(fields: dict[str, Any]) -> None:
    """``to_hash_new`` writes a just-created record's JSON directly; it is the text ``record_json`` dumps to,
    and any record that is not a plain new one is dumped."""
    rec = SendRecord("s5", {"message_id": "<m@x>", "to": ["a@x.org"]}, SendState.QUEUED, **fields)
    stored = rec.to_hash_new()
    assert stored["record"] == compact_json(rec.record_json())
    assert stored["mail"] == compact_json(rec.mail)


def test_a_new_records_times_are_written_as_repr_writes_them() -> None:
    """``to_hash_new`` remembers the text of the last time it wrote (a batch's sends share one ``now``)."""
    now = 1764629000.123456
    for created, updated in [(now, now), (now, now + 1), (0.0, -0.0), (-0.0, -0.0), (now, now), (1e300, 0.1),
                             (float("nan"), now), (now, 1.0 / 3)]:  # fmt: skip
        rec = SendRecord("s6", {"message_id": "<m@x>"}, SendState.QUEUED, created_at=created,
                         updated_at=updated)
        stored = rec.to_hash_new()
        assert (stored["created_at"], stored["updated_at"]) == (repr(created), repr(updated))


@pytest.mark.parametrize(
    "extra",
    [{}, {"html": "<p>x</p>", "cc": ["c@x.org"]},
     {"attachments": [{"filename": "a.txt", "content_type": "text/plain", "content": "YWJj"}]}],
    ids=repr,
)  # fmt: skip
def test_a_summary_made_in_place_is_the_summary_of_a_copy(extra: dict[str, Any]) -> None:
    mail = validated({"from": "a@x.org", "to": ["b@x.org", "B@x.org"], "text": "t", **extra})
    copied = mail_summary(mail, mail.to_dict())
    assert mail_summary(mail, mail.to_dict(), in_place=True) == copied == mail_summary(mail)
    assert list(mail_summary(mail, mail.to_dict(), in_place=True)) == list(copied)  # the same key order
