"""``dispatcher.testing.outbox()`` (issue 16): an app's tests see what would have been enqueued —
validated, templates rendered — and nothing reaches Redis (here: a port nothing listens on)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from helpers import free_port
from redis.backoff import NoBackoff
from redis.retry import Retry

import dispatcher
from dispatcher.errors import QueueUnavailable, ValidationError
from dispatcher.testing import Outbox, outbox


def plain(to: str) -> dict[str, str]:
    return {"from": "shop@example.com", "to": to, "text": "x"}


@pytest.fixture
def nowhere() -> redis.Redis:
    """A client of a Redis that is not there: anything that reaches it fails."""
    return redis.Redis(port=free_port(), socket_connect_timeout=1, retry=Retry(NoBackoff(), 0))


def test_enqueue_is_captured_validated_and_reaches_no_redis(nowhere: redis.Redis) -> None:
    with outbox() as sent:
        send_id = dispatcher.enqueue({"from": "shop@example.com", "to": "Ann <ann@example.org>",
                                      "subject": "Welcome", "text": "Hi"}, connection=nowhere)  # fmt: skip
        dispatcher.enqueue_many([{"from": "shop@example.com", "to": f"r{n}@example.org", "text": "x"}
                                 for n in range(3)], connection=nowhere)  # fmt: skip
    assert send_id.startswith("mail-")
    assert len(sent) == 4
    welcome = sent.one(to="ann@example.org", subject="Welcome")
    assert welcome.message_id.startswith("<") and welcome.text == "Hi"
    assert len(sent.find(text="x")) == 3 and sent.find(to="nobody@example.org") == []
    with pytest.raises(QueueUnavailable):  # closed: the producer goes to Redis again
        dispatcher.enqueue(plain("ann@example.org"), connection=nowhere)


def test_an_invalid_mail_still_raises_and_is_not_captured(nowhere: redis.Redis) -> None:
    with outbox() as sent, pytest.raises(ValidationError) as caught:
        dispatcher.enqueue({"from": "shop@example.com", "to": "ann@", "text": "x"}, connection=nowhere)
    assert list(caught.value.problems) == ["to"] and len(sent) == 0


def test_templates_are_rendered_into_the_captured_mail(nowhere: redis.Redis, tmp_path: Path) -> None:
    (tmp_path / "welcome").mkdir()
    (tmp_path / "welcome" / "subject.txt").write_text("Hi {{ name }}", encoding="utf-8")
    (tmp_path / "welcome" / "body.txt").write_text("Welcome, {{ name }}.", encoding="utf-8")
    producer = dispatcher.Producer(nowhere, templates_dir=tmp_path)
    with outbox() as sent:
        producer.enqueue({"from": "shop@example.com", "to": "ann@example.org", "template": "welcome",
                          "data": {"name": "Ann"}})  # fmt: skip
    mail = sent.one(template="welcome", to="ann@example.org")
    assert (mail.subject, mail.text) == ("Hi Ann", "Welcome, Ann.")


def test_outboxes_nest_and_one_names_what_it_found(dispatcher_outbox: Outbox, nowhere: redis.Redis) -> None:
    with outbox() as inner:
        dispatcher.enqueue(plain("ann@example.org"), connection=nowhere)
    dispatcher.enqueue(plain("bob@example.org"), connection=nowhere)
    assert len(inner) == 1 and len(dispatcher_outbox) == 2
    with pytest.raises(AssertionError, match="0 mails match"):
        dispatcher_outbox.one(to="carl@example.org")
