"""Validation and building cost grows linearly with the input within the limits, and a value far over a
limit is refused without the expensive checks (issue 14: a 1 MB subject cost the worker 19 s per attempt,
a 500 KB header value the API 10 s). Work is counted, not timed: every Python and C function call made
while a mail is validated and built (``sys.setprofile``), which is deterministic on a loaded machine."""

from __future__ import annotations

import collections
import email.headerregistry
import sys
from collections.abc import Callable
from typing import Any

import pytest
from helpers import count_calls

from dispatcher.errors import ValidationError
from dispatcher.mail import header_fold, limits
from dispatcher.mail.mime import build_message, validated

BASE: dict[str, Any] = {"from": "a@example.com", "to": "b@example.org", "text": "hi"}
ATTACHMENT = {"content_type": "text/plain", "content": "aGk="}
NAME = "Änn Lee "


def words(word: str, length: int) -> str:
    return (word * length)[:length].strip()


# name -> (fields of size n, n just under the limit)
CASES: dict[str, tuple[Callable[[int], dict[str, Any]], int]] = {
    "subject": (lambda n: {"subject": words("wörd ", n)}, limits.MAX_SUBJECT_CHARS),
    "header value": (lambda n: {"headers": {"X-A": words("wörd ", n)}}, limits.MAX_HEADER_VALUE_CHARS),
    "headers": (lambda n: {"headers": {f"X-H{i}": "wörd wörd" for i in range(n)}}, limits.MAX_CUSTOM_HEADERS),
    "recipients": (
        lambda n: {"to": [f"Änn Lee{i} <u{i}@example.org>" for i in range(n)]},
        limits.MAX_RECIPIENTS,
    ),
    "reply_to": (
        lambda n: {"reply_to": [f"{NAME}<u{i}@example.org>" for i in range(n)]},
        limits.MAX_REPLY_TO,
    ),
    "display name": (
        lambda n: {"from": words(NAME, n) + " <a@example.com>"},
        limits.MAX_DISPLAY_NAME_CHARS,
    ),
    "attachments": (
        lambda n: {"attachments": [{**ATTACHMENT, "filename": f"ä{i}.txt"} for i in range(n)]},
        limits.MAX_ATTACHMENTS,
    ),
}
OVER: dict[str, dict[str, Any]] = {
    "subject": {"subject": "wörd " * 200_000},
    "headers.X-A": {"headers": {"X-A": "wörd " * 100_000}},
    "headers": {"headers": {f"X-H{i}": "wörd" for i in range(100_000)}},
    "recipients": {"to": [f"{NAME}<u{i}@example.org>" for i in range(100_000)]},
    "reply_to": {"reply_to": [f"{NAME}<u{i}@example.org>" for i in range(100_000)]},
    "from": {"from": NAME * 100_000 + "<a@example.com>"},
    "attachments": {"attachments": [{**ATTACHMENT, "filename": "a.txt"}] * 100_000},
}


def calls(data: dict[str, Any], *, build: bool = True) -> int:
    """Function calls made while ``data`` is validated (and built); a refusal counts the same."""
    return count_calls(lambda: validated(data, build=build))


@pytest.mark.parametrize("name", sorted(CASES))
def test_cost_just_under_a_limit_is_linear(name: str) -> None:
    fields, limit = CASES[name]
    validated({**BASE, **fields(limit)})  # accepted at the limit
    half, full = calls({**BASE, **fields(limit // 2)}), calls({**BASE, **fields(limit)})
    assert full <= 2.3 * half, f"{name}: {half} calls at {limit // 2}, {full} at {limit}"


@pytest.mark.parametrize("path", sorted(OVER))
def test_far_over_a_limit_is_refused_for_the_price_of_a_small_mail(path: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validated({**BASE, **OVER[path]}, build=False)
    assert path in caught.value.problems
    baseline = calls(BASE, build=False)
    assert calls({**BASE, **OVER[path]}, build=False) <= 2 * baseline + 1000, path


def test_a_build_folds_each_header_once_without_the_header_registry() -> None:
    """``check_written`` reuses the folding the generator wrote: each header of the message is folded once
    (``header_fold.field``), not twice; and a mail of the common shapes never reaches the modern policy's
    header registry (parsing and refolding every header there was a third of a worker's CPU, issue 15)."""
    mail = validated({**BASE, "subject": words("wörd ", 998), "headers": {"X-A": "wörd wörd"}}, build=False)
    watched = {header_fold.field.__code__: "field", email.headerregistry.BaseHeader.fold.__code__: "registry",
               email.headerregistry.HeaderRegistry.__call__.__code__: "registry"}  # fmt: skip
    calls = collections.Counter[str]()

    def profile(frame: Any, event: str, arg: object) -> None:
        if event == "call" and frame.f_code in watched:
            calls[watched[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        build_message(mail)
    finally:
        sys.setprofile(None)
    # From, To, Subject, Date, Message-ID, MIME-Version, X-A, Content-Type, Content-Transfer-Encoding
    assert calls == {"field": 9}, calls
