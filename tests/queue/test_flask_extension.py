"""``dispatcher.flask.Dispatcher`` in a real Flask app through its test client (issue 16): config from
``app.config``, ``send`` inside a request, the Flask-Mail ``Message`` look-alike, templates, the
init_app pattern and the test outbox — delivered by a real worker to an SMTP sink."""

from __future__ import annotations

from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask, request
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

from dispatcher.errors import ValidationError
from dispatcher.flask import Dispatcher, Message
from dispatcher.queue.store import SendStore
from dispatcher.testing import Outbox

StartWorkers = Callable[..., WorkerRun]
SmtpServer = Callable[..., RecordingSmtpServer]
mailer = Dispatcher()  # the init_app pattern: one extension object, apps made by a factory


def create_app(**config: Any) -> Flask:
    app = Flask(__name__)
    app.config.update(TESTING=True, **config)
    mailer.init_app(app)

    @app.post("/signup")
    def signup() -> dict[str, str]:
        done = mailer.send({"to": request.form["email"], "subject": "Welcome", "text": "Hi!"})
        return {"id": done.id}

    @app.post("/receipt")
    def receipt() -> dict[str, str]:
        options = {"priority": "high", "key": "receipt-" + request.form["order"]}
        message = Message("Your receipt", recipients=[("Ann", request.form["email"])], body="Thanks",
                          html='<p>Thanks <img src="cid:logo"></p>', bcc=["audit@example.com"],
                          dispatch=options)  # fmt: skip
        message.attach("receipt.pdf", "application/pdf", b"%PDF-1.4 receipt")
        logo = {"Content-ID": "<logo>"}
        message.attach("logo.png", "image/png", b"\x89PNG", "inline", headers=logo)
        return {"id": mailer.send(message).id}

    @app.post("/templated")
    def templated() -> dict[str, str]:
        data = {"name": request.form["name"]}
        return {"id": mailer.send({"to": request.form["email"], "template": "hello", "data": data}).id}

    return app


@pytest.fixture
def templates_dir(tmp_path: Path) -> Path:
    (tmp_path / "hello").mkdir()
    (tmp_path / "hello" / "subject.txt").write_text("Hello {{ name }}", encoding="utf-8")
    (tmp_path / "hello" / "body.html").write_text("<p>Hello <b>{{ name }}</b></p>", encoding="utf-8")
    return tmp_path


def parsed(raw: bytes) -> EmailMessage:
    message = message_from_bytes(raw, policy=policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_views_enqueue_with_the_apps_config_and_a_worker_delivers(
    redis_url: str, redis_client: redis.Redis, templates_dir: Path, smtp_server: SmtpServer,
    start_workers: StartWorkers,
) -> None:  # fmt: skip
    app = create_app(DISPATCH_REDIS_URL=redis_url, DISPATCH_DEFAULT_SENDER=("Shop", "shop@example.com"),
                     DISPATCH_ROUTE="default", DISPATCH_TEMPLATES_DIR=str(templates_dir))  # fmt: skip
    client = app.test_client()
    ids = [
        client.post("/signup", data={"email": "ann@example.org"}).get_json()["id"],
        client.post("/receipt", data={"email": "bob@example.net", "order": "12"}).get_json()["id"],
        client.post("/receipt", data={"email": "bob@example.net", "order": "12"}).get_json()["id"],
        client.post("/templated", data={"email": "cy@example.org", "name": "Cy"}).get_json()["id"],
    ]
    assert ids[1] == ids[2]  # the same key: one send
    store = SendStore(redis_client)
    assert store.load(ids[1]).mail["priority"] == "high"
    assert store.count_states()["queued"] == 3

    sink = smtp_server()
    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=60) == 0, worker.text()
    got = {m.rcpt_tos[0]: (m, parsed(m.data)) for m in sink.messages}
    assert sorted(got) == ["ann@example.org", "bob@example.net", "cy@example.org"]
    assert str(got["ann@example.org"][1]["From"]) == "Shop <shop@example.com>"
    receipt_envelope, receipt = got["bob@example.net"]
    assert sorted(receipt_envelope.rcpt_tos) == ["audit@example.com", "bob@example.net"]
    assert "Bcc" not in receipt and str(receipt["To"]) == "Ann <bob@example.net>"
    assert [p.get_content_type() for p in receipt.walk()] == [
        "multipart/mixed", "multipart/related", "multipart/alternative", "text/plain", "text/html",
        "image/png", "application/pdf",
    ]  # fmt: skip
    hello = got["cy@example.org"][1]
    assert str(hello["Subject"]) == "Hello Cy"
    text = hello.get_body(("plain",))
    assert text is not None and text.get_content().strip() == "Hello Cy"  # made from the HTML


def test_a_bad_mail_in_a_view_names_the_field_and_stores_nothing(
    redis_url: str, redis_client: redis.Redis
) -> None:
    client = create_app(DISPATCH_REDIS_URL=redis_url, MAIL_DEFAULT_SENDER="shop@example.com").test_client()
    with pytest.raises(ValidationError) as caught:
        client.post("/signup", data={"email": "not an address"})
    assert list(caught.value.problems) == ["to"]
    assert redis_client.dbsize() == 0


def test_send_many_is_validated_whole_and_named_by_index(redis_url: str, redis_client: redis.Redis) -> None:
    app = create_app(DISPATCH_REDIS_URL=redis_url, MAIL_DEFAULT_SENDER="shop@example.com")
    mails = [{"to": "a@example.org", "text": "x"}, {"to": "b@", "text": "x"}]
    with app.app_context():
        with pytest.raises(ValidationError) as caught:
            mailer.send_many(mails)
        assert list(caught.value.problems) == ["[1].to"]
        assert redis_client.dbsize() == 0
        assert len(mailer.send_many(mails[:1] * 3)) == 3


def test_the_outbox_fixture_captures_a_views_mail_without_redis(dispatcher_outbox: Outbox) -> None:
    app = create_app(DISPATCH_REDIS_URL="redis://127.0.0.1:1/0", MAIL_DEFAULT_SENDER="shop@example.com")
    response = app.test_client().post("/signup", data={"email": "ann@example.org"})
    assert response.status_code == 200
    mail = dispatcher_outbox.one(to="ann@example.org", subject="Welcome")
    assert mail.text == "Hi!" and mail.from_address.addr_spec == "shop@example.com"


def test_a_flask_mail_message_maps_onto_the_mail_schema() -> None:
    message = Message("Hi", recipients=["ann@example.org"], body="x", sender=("Shop", "shop@example.com"),
                      reply_to="help@example.com", date=1_800_000_000,
                      extra_headers={"X-Tag": "a"})  # fmt: skip
    message.add_recipient(("Bob", "bob@example.net"))
    message.attach("n.txt", "text/plain", "grüß", headers=[("Content-ID", "<n>")])
    assert message.to_mail() == {
        "from": "Shop <shop@example.com>", "to": ["ann@example.org", "Bob <bob@example.net>"],
        "reply_to": "help@example.com", "subject": "Hi", "text": "x", "headers": {"X-Tag": "a"},
        "date": "Fri, 15 Jan 2027 08:00:00 +0000",
        "attachments": [{"filename": "n.txt", "content_type": "text/plain", "content": "Z3LDvMOf",
                         "charset": "utf-8", "content_id": "<n>"}],
    }  # fmt: skip
