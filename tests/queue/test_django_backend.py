"""``EMAIL_BACKEND = "dispatcher.django.EmailBackend"`` end to end (issue 16): Django configured in the
test, a private Redis, a real worker, an SMTP sink — and Django's own SMTP backend sending the same
``EmailMessage`` to a second sink. Each Django API gives the same MIME tree at both sinks (Message-ID and
Date aside) and the same envelope."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.mime.application import MIMEApplication
from email.mime.image import MIMEImage
from pathlib import Path
from typing import Any

import django
import pytest
import redis
from django.conf import settings
from django.core import mail as django_mail
from django.core.mail import BadHeaderError, EmailMessage, EmailMultiAlternatives
from django.db import transaction
from django.test.utils import override_settings
from django.utils.translation import gettext_lazy
from mime_tree import tree
from queue_support import WorkerRun, smtp_url
from servers import RecordingSmtpServer

from dispatcher.errors import ValidationError
from dispatcher.queue.store import SendStore

StartWorkers = Callable[..., WorkerRun]
SmtpServer = Callable[..., RecordingSmtpServer]
Connection = Any


@pytest.fixture(scope="session")
def django_settings() -> None:
    """Django configured once for the session (``settings.configure`` may run once per process)."""
    if not settings.configured:
        settings.configure(
            DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
            EMAIL_BACKEND="dispatcher.django.EmailBackend",
            DEFAULT_FROM_EMAIL="Shop <shop@example.com>",
            SERVER_EMAIL="server@example.com",
            ADMINS=[("Ops", "ops@example.com")],
            USE_I18N=True,
            USE_TZ=True,
            INSTALLED_APPS=[],
        )
        django.setup()


@pytest.fixture
def dispatch(django_settings: None, redis_url: str) -> Iterator[None]:
    with override_settings(DISPATCH_REDIS_URL=redis_url):
        yield


def reference(port: int) -> Connection:
    """Django's own SMTP backend, to the sink on ``port``."""
    return django_mail.get_connection(
        "django.core.mail.backends.smtp.EmailBackend", host="127.0.0.1", port=port, timeout=10
    )


def multi(subject: str, **kwargs: Any) -> EmailMultiAlternatives:
    body = "Hello Ann,\nyour order shipped."
    return EmailMultiAlternatives(subject, body, to=["ann@example.org"], **kwargs)


def each_api(tmp_path: Path) -> list[Callable[[Connection | None], Any]]:
    """Every API the issue names, each sending through ``connection`` (None: the configured backend)."""
    csv = tmp_path / "report.csv"
    csv.write_text("a,b\n1,2\n", encoding="utf-8")
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))

    def send_mail(connection: Connection | None) -> Any:
        to = ["ann@example.org"]
        return django_mail.send_mail("Plain", "Hello\nthere.", None, to, connection=connection)

    def send_mail_html(connection: Connection | None) -> Any:
        return django_mail.send_mail(
            "Text and HTML", "Hi", "shop@example.com", ["ann@example.org", "Bob <bob@example.net>"],
            html_message="<p>Hi <b>there</b></p>", connection=connection,
        )  # fmt: skip

    def send_mass_mail(connection: Connection | None) -> Any:
        return django_mail.send_mass_mail(
            (("Mass 1", "first", None, ["ann@example.org"]), ("Mass 2", "second", None, ["bob@example.net"])),
            connection=connection,
        )

    def mail_admins(connection: Connection | None) -> Any:
        return django_mail.mail_admins("Disk full", "92%", html_message="<p>92%</p>", connection=connection)

    def addresses_and_headers(connection: Connection | None) -> Any:
        message = EmailMessage(
            "Grüße aus Köln — Ihre Bestellung", "Grüße, Jürgen! 😀\n" * 3, "Jürgen Müller <shop@example.com>",
            to=["Ann Ö <ann@example.org>"], cc=["carl@example.org"], bcc=["audit@example.com"],
            reply_to=["Support <help@example.com>"],
            headers={"X-Campaign": "winter-1", "List-Unsubscribe": "<mailto:unsub@example.com>",
                     "X-Note": "Grüße"},
            connection=connection,
        )  # fmt: skip
        return message.send()

    def attachments(connection: Connection | None) -> Any:
        message = multi("Attachments", connection=connection)
        message.attach_alternative("<p>Hello Ann,<br>your order shipped.</p>", "text/html")
        message.attach("notes.txt", "Danke schön\n", "text/plain")
        message.attach("invoice.pdf", b"%PDF-1.4\n" + bytes(range(256)), "application/pdf")
        message.attach("Übersicht.bin", b"\x00\x01\x02", "application/octet-stream")
        message.attach_file(str(csv))
        part = MIMEApplication(b'{"a": 1}', "json")
        part.add_header("Content-Disposition", "attachment", filename="data.json")
        message.attach(part)
        return message.send()

    def inline_image(connection: Connection | None) -> Any:
        message = multi("Inline image", connection=connection)
        message.attach_alternative('<p>Logo: <img src="cid:logo@shop.example.com"></p>', "text/html")
        message.mixed_subtype = "related"
        image = MIMEImage(png, "png")
        image.add_header("Content-ID", "<logo@shop.example.com>")
        image.add_header("Content-Disposition", "inline", filename="logo.png")
        message.attach(image)
        return message.send()

    def lazy_subject(connection: Connection | None) -> Any:
        subject = gettext_lazy("Lazy subject")
        message = EmailMessage(subject, "body", to=["ann@example.org"], connection=connection)
        return message.send()

    return [send_mail, send_mail_html, send_mass_mail, mail_admins, addresses_and_headers, attachments,
            inline_image, lazy_subject]  # fmt: skip


def by_subject(sink: RecordingSmtpServer) -> dict[str, tuple[dict[str, Any], str, list[str]]]:
    out = {}
    for message in sink.messages:
        parsed = tree(message.data)
        subject = dict(parsed["headers"])["subject"]
        out[subject] = (parsed, message.mail_from, sorted(message.rcpt_tos))
    return out


def test_every_django_api_arrives_as_djangos_smtp_backend_sends_it(
    dispatch: None, tmp_path: Path, smtp_server: SmtpServer, start_workers: StartWorkers,
    redis_client: redis.Redis,
) -> None:  # fmt: skip
    ours, theirs = smtp_server(), smtp_server()
    for api in each_api(tmp_path):
        assert api(None) == api(reference(theirs.port)), api.__name__  # the same count sent
    assert SendStore(redis_client).count_states()["queued"] == 9  # enqueued, not sent
    assert len(theirs.messages) == 9

    worker = start_workers(smtp_url(ours.port), "--burst")
    assert worker.wait(timeout=60) == 0, worker.text()

    expected, got = by_subject(theirs), by_subject(ours)
    assert sorted(got) == sorted(expected)
    for subject, (django_tree, django_from, django_rcpts) in expected.items():
        tree_got, mail_from, rcpts = got[subject]
        assert (mail_from, rcpts) == (django_from, django_rcpts), subject
        assert tree_got == django_tree, subject


def test_the_message_id_django_set_is_the_one_sent_and_the_ledgers_key(
    dispatch: None, smtp_server: SmtpServer, start_workers: StartWorkers, redis_client: redis.Redis
) -> None:
    sink = smtp_server()
    headers = {"Message-ID": "<order-7@shop.example.com>"}
    EmailMessage("Kept id", "x", to=["ann@example.org"], headers=headers).send()
    store = SendStore(redis_client)
    (send_id,) = SendStore(redis_client).ids_in_state("queued")
    assert store.load(send_id).mail["message_id"] == "<order-7@shop.example.com>"
    worker = start_workers(smtp_url(sink.port), "--burst")
    assert worker.wait(timeout=30) == 0, worker.text()
    assert b"\r\nMessage-ID: <order-7@shop.example.com>\r\n" in sink.messages[0].data


def queued(client: redis.Redis) -> list[dict[str, Any]]:
    store = SendStore(client)
    return [store.load(i).mail for i in reversed(store.ids_in_state("queued"))]


def test_one_bad_message_names_its_index_and_field_and_nothing_of_the_call_is_enqueued(
    dispatch: None, redis_client: redis.Redis
) -> None:
    good = EmailMessage("ok", "x", to=["ann@example.org"])
    bad = EmailMessage("bad", "x", to=["not-an-address"])
    connection = django_mail.get_connection()
    with pytest.raises(ValidationError) as caught:
        connection.send_messages([good, bad])
    assert list(caught.value.problems) == ["[1].to[0]"]
    assert queued(redis_client) == []
    assert django_mail.get_connection(fail_silently=True).send_messages([good, bad]) == 0
    assert queued(redis_client) == []


def test_send_messages_counts_what_it_enqueued_in_one_transaction(
    dispatch: None, redis_client: redis.Redis
) -> None:
    messages = [EmailMessage(f"m{n}", "x", to=[f"r{n}@example.org"]) for n in range(3)]
    nobody = EmailMessage("nobody", "x")  # no recipients: skipped, as Django's SMTP backend skips it
    assert django_mail.get_connection().send_messages([*messages, nobody]) == 3
    assert sorted(m["subject"] for m in queued(redis_client)) == ["m0", "m1", "m2"]
    assert len(redis_client.lrange("rq:queue:mail-default", 0, -1)) == 1  # one batch job for the call


def test_dispatch_options_and_settings_choose_priority_route_key_and_schedule(
    dispatch: None, redis_client: redis.Redis
) -> None:
    urgent = EmailMessage("urgent", "x", to=["ann@example.org"])
    urgent.dispatch = {"priority": "high", "key": "reset-ann-1", "metadata": {"user": 7}}
    later = EmailMessage("later", "x", to=["ann@example.org"])
    later.dispatch = {"send_at": datetime.now(UTC) + timedelta(hours=1)}
    with override_settings(DISPATCH_PRIORITY="bulk", DISPATCH_ROUTE="marketing"):
        assert django_mail.get_connection().send_messages([urgent, later]) == 2
        again = EmailMessage("urgent", "x", to=["ann@example.org"])
        again.dispatch = {"priority": "high", "key": "reset-ann-1", "metadata": {"user": 7}}
        assert again.send() == 1  # the same key: a duplicate, delivered once
    mails = {m["subject"]: m for m in queued(redis_client)}
    assert set(mails) == {"urgent"}  # "later" is scheduled
    assert (mails["urgent"]["priority"], mails["urgent"]["route"]) == ("high", "marketing")
    assert mails["urgent"]["key"] == "reset-ann-1" and mails["urgent"]["metadata"] == {"user": 7}
    assert SendStore(redis_client).count_states()["scheduled"] == 1


def test_a_bad_dispatch_option_is_named(dispatch: None) -> None:
    message = EmailMessage("x", "x", to=["ann@example.org"])
    message.dispatch = {"priority": "urgent", "retries": 3, "send_at": datetime(2030, 1, 1)}
    with pytest.raises(ValidationError) as caught:
        message.send()
    assert set(caught.value.problems) == {"[0].priority", "[0].dispatch.retries", "[0].send_at"}
    assert "timezone" in caught.value.problems["[0].send_at"]


def test_an_extra_to_header_telling_another_story_than_the_envelope_is_refused(dispatch: None) -> None:
    message = EmailMessage("x", "x", to=["ann@example.org"], headers={"To": "everyone@example.org"})
    with pytest.raises(ValidationError) as caught:
        message.send()
    assert "differs from the message's to" in caught.value.problems["[0].headers.To"]


def test_an_unqueueable_part_is_refused_by_name(dispatch: None) -> None:
    message = EmailMessage("x", "x", to=["ann@example.org"])
    message.attach("forwarded.eml", EmailMessage("inner", "y", to=["b@example.org"]), "message/rfc822")
    with pytest.raises(ValidationError) as caught:
        message.send()
    assert "message/rfc822 part cannot be queued" in caught.value.problems["[0].attachments[0]"]


def test_the_test_backend_checks_like_the_real_one_and_keeps_mail_without_redis(
    django_settings: None,
) -> None:
    from dispatcher.testing import outbox

    with override_settings(EMAIL_BACKEND="dispatcher.django.TestBackend"), outbox() as sent:
        django_mail.outbox = []
        assert django_mail.send_mail("Welcome", "Hi Ann", None, ["ann@example.org"]) == 1
        with pytest.raises(ValidationError) as caught:
            django_mail.get_connection().send_messages(
                [EmailMessage("nobody", "x"), EmailMessage("Broken", "x", to=["ann@"])]
            )
        assert list(caught.value.problems) == ["[1].to[0]"]  # its index in the call, the skipped one counted
    assert [m.subject for m in django_mail.outbox] == ["Welcome"]
    mail = sent.one(to="ann@example.org", subject="Welcome")
    assert mail.text == "Hi Ann" and mail.from_address.addr_spec == "shop@example.com"


def test_without_dispatch_redis_url_the_backend_uses_redis_url(
    django_settings: None, redis_url: str, redis_client: redis.Redis
) -> None:
    with override_settings(REDIS_URL=redis_url):
        assert django_mail.send_mail("Via REDIS_URL", "x", None, ["ann@example.org"]) == 1
    assert [m["subject"] for m in queued(redis_client)] == ["Via REDIS_URL"]


def test_on_commit_defers_the_enqueue_to_the_commit_and_a_rollback_sends_nothing(
    dispatch: None, redis_client: redis.Redis
) -> None:
    """The README's one-liner: without it the enqueue happens at ``send()``, inside the transaction."""
    with transaction.atomic():
        transaction.on_commit(lambda: django_mail.send_mail("Committed", "x", None, ["ann@example.org"]))
        assert queued(redis_client) == []
    assert [m["subject"] for m in queued(redis_client)] == ["Committed"]
    with pytest.raises(RuntimeError), transaction.atomic():
        transaction.on_commit(lambda: django_mail.send_mail("Rolled back", "x", None, ["ann@example.org"]))
        raise RuntimeError("the order failed")
    assert [m["subject"] for m in queued(redis_client)] == ["Committed"]


def test_a_header_django_refuses_raises_djangos_bad_header_error_as_its_smtp_backend_does(
    dispatch: None, redis_client: redis.Redis
) -> None:
    with pytest.raises(BadHeaderError):
        django_mail.send_mail("Hi\nBcc: x@example.org", "x", None, ["ann@example.org"], fail_silently=True)
    assert queued(redis_client) == []
