"""Resource limits (issue 14): a mail over one of the README's limits is a field error at enqueue through
every producer — the Python API and ``enqueue.py send`` / ``bulk`` here, the HTTP API in
``tests/dashboard/test_api.py`` — and nothing is stored. Before, 100,000 recipients were accepted (an
8.3 MB record), and so were a 1 MB subject and 500 KB header values."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import redis

import dispatcher
from dispatcher import cli
from dispatcher.errors import ValidationError
from dispatcher.mail import limits
from dispatcher.queue.producer import Producer

BASE: dict[str, Any] = {"from": "a@example.com", "to": "b@example.org", "text": "x"}
ATTACHMENT = {"filename": "a.txt", "content_type": "text/plain", "content": "aGk="}


def addresses(count: int, tag: str = "u") -> list[str]:
    return [f"{tag}{index}@example.org" for index in range(count)]


# field path -> (fields over the limit, fields just at it)
CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "recipients": (
        {"to": addresses(400), "cc": addresses(300, "c"), "bcc": addresses(301, "b")},
        {"to": addresses(400), "cc": addresses(300, "c"), "bcc": addresses(300, "b")},
    ),
    "reply_to": ({"reply_to": addresses(51)}, {"reply_to": addresses(50)}),
    "from": ({"from": "N" * 201 + " <a@example.com>"}, {"from": "N" * 200 + " <a@example.com>"}),
    "subject": ({"subject": "s" * 999}, {"subject": "s" * 998}),
    "headers": (
        {"headers": {f"X-H{i}": "v" for i in range(51)}},
        {"headers": {f"X-H{i}": "v" for i in range(50)}},
    ),
    "headers.X-Long": ({"headers": {"X-Long": "ab " * 683}}, {"headers": {"X-Long": "ab " * 682 + "ab"}}),
    "attachments": ({"attachments": [ATTACHMENT] * 251}, {"attachments": [ATTACHMENT] * 250}),
}


@pytest.mark.parametrize("path", sorted(CASES))
def test_python_api_refuses_over_a_limit_and_takes_the_limit(path: str, redis_client: redis.Redis) -> None:
    over, at = CASES[path]
    with pytest.raises(ValidationError) as caught:
        dispatcher.enqueue({**BASE, **over}, connection=redis_client)
    assert set(caught.value.problems) == {path}, caught.value.problems
    assert "limit" in caught.value.problems[path]
    assert redis_client.dbsize() == 0
    assert dispatcher.enqueue({**BASE, **at}, connection=redis_client).startswith("mail-")


def test_enqueue_many_names_the_item(redis_client: redis.Redis) -> None:
    with pytest.raises(ValidationError) as caught:
        dispatcher.enqueue_many([BASE, {**BASE, "subject": "s" * 5000}], connection=redis_client)
    assert list(caught.value.problems) == ["[1].subject"]
    assert redis_client.dbsize() == 0


def test_the_recipient_limit_is_a_setting(redis_client: redis.Redis) -> None:
    mail = {**BASE, "to": addresses(3)}
    with pytest.raises(ValidationError) as caught:
        Producer(redis_client, max_recipients=2).enqueue(mail)
    assert "DISPATCH_MAX_RECIPIENTS" in caught.value.problems["recipients"]
    assert Producer(redis_client, max_recipients=3).enqueue(mail).id


def test_send_refuses_too_many_recipients(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPATCH_MAX_RECIPIENTS", "2")
    send = ["--redis-url", redis_url, "send", "--from", "a@example.com", "--text", "x"]
    for extra, expected in (
        (
            [item for address in addresses(3) for item in ("--to", address)],
            "recipients: too many: 3 addresses",
        ),
        (["--to", "b@example.org", "--subject", "s" * 999], "subject: too long: 999 characters"),
    ):
        out, err = io.StringIO(), io.StringIO()
        assert cli.main([*send, *extra], out, err) == cli.EXIT_USAGE
        assert expected in err.getvalue() and out.getvalue() == ""
    assert redis_client.dbsize() == 0


def test_bulk_reports_each_line_over_a_limit(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [json.dumps({**BASE, **over}) for over, _ in CASES.values()] + [json.dumps(BASE)]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    out, err = io.StringIO(), io.StringIO()
    assert cli.main(["--redis-url", redis_url, "bulk", "-"], out, err) == cli.EXIT_INVALID_LINES
    summary = json.loads(out.getvalue())
    assert summary["enqueued"] == 1 and summary["invalid_lines"] == list(range(1, len(CASES) + 1))
    for number, path in enumerate(CASES, start=1):
        assert f"line {number}: {path}: " in err.getvalue(), err.getvalue()


def test_the_limits_table_names_every_limit() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### Limits", 1)[1].split("\n\n", 3)[2]
    for number in (limits.MAX_RECIPIENTS, limits.MAX_REPLY_TO, limits.MAX_DISPLAY_NAME_CHARS,
                   limits.MAX_SUBJECT_CHARS, limits.MAX_CUSTOM_HEADERS, limits.MAX_HEADER_VALUE_CHARS,
                   limits.MAX_ATTACHMENTS):  # fmt: skip
        assert f"| {number:,} " in table, number
