"""Django's email backends on dispatcher's queue: ``EMAIL_BACKEND = "dispatcher.django.EmailBackend"``.

``send_mail``, ``send_mass_mail``, ``mail_admins``, ``EmailMessage`` and ``EmailMultiAlternatives`` then
enqueue instead of sending. Each message is rendered by Django itself (``EmailMessage.message()``: lazy
strings resolved, attachments and alternatives built, its Message-ID set) and that MIME tree is read back
into the mail schema (:mod:`dispatcher.mail.reader`), so the worker writes the message Django's SMTP
backend would have sent, with Django's Message-ID (the ledger and idempotency key on it). The envelope is
Django's too: ``from_email`` and ``recipients()`` (Bcc included).

Settings: ``DISPATCH_REDIS_URL`` (default ``REDIS_URL``), ``DISPATCH_PRIORITY``, ``DISPATCH_ROUTE``. Per
message: ``message.dispatch = {"priority": ..., "route": ..., "key": ..., "send_at": ..., "metadata":
...}``. ``TestBackend`` checks every message the same way and keeps it in ``django.core.mail.outbox`` and
:func:`dispatcher.testing.outbox`, without Redis.

This module is the only one that imports Django; ``import dispatcher`` never loads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import redis
import structlog
from django.conf import settings
from django.core import mail as django_mail
from django.core.mail.backends.base import BaseEmailBackend
from django.core.mail.message import BadHeaderError, EmailMessage

from dispatcher import testing
from dispatcher.errors import DispatcherError, IdempotencyConflict, ValidationError
from dispatcher.mail.addresses import parse_address
from dispatcher.mail.message import Mail
from dispatcher.mail.mime import validated
from dispatcher.mail.reader import mail_from_mime
from dispatcher.queue.producer import Producer, connect
from dispatcher.settings import DEFAULT_REDIS_URL

log = structlog.get_logger("dispatcher.django")

#: What ``message.dispatch`` may hold: the schema fields that say how a mail goes, not what it says.
DISPATCH_OPTIONS = frozenset({"priority", "route", "key", "send_at", "metadata"})

_clients: dict[str, redis.Redis] = {}
_clients_lock = threading.Lock()


def redis_client(url: str) -> redis.Redis:
    """One client (one connection pool) per URL for the process: Django makes a backend per send."""
    with _clients_lock:
        if url not in _clients:
            _clients[url] = connect(url)
        return _clients[url]


def mail_of(message: EmailMessage) -> tuple[dict[str, Any], dict[str, str]]:
    """The mail dict for one Django message, not yet validated, and the problems found reading it."""
    problems: dict[str, str] = {}
    try:
        data = mail_from_mime(message.message())
    except ValidationError as exc:
        return {}, dict(exc.problems)
    overridden = {name.lower() for name in message.extra_headers}
    if "date" not in overridden:
        data.pop("date", None)  # Django dates it now; ours is now too, or when a send_at is due
    _same_addresses(problems, "from", [str(message.from_email)], data.get("from"))
    _same_addresses(problems, "to", [str(a) for a in message.to], data.get("to"))
    _same_addresses(problems, "cc", [str(a) for a in message.cc], data.get("cc"))
    data["from"] = str(message.from_email)
    for name, addresses in (("to", message.to), ("cc", message.cc)):
        if addresses:  # by the envelope's own list, so a problem is named by its index there
            data[name] = [str(address) for address in addresses]
    if message.bcc:
        data["bcc"] = [str(address) for address in message.bcc]
    data.update(_options(message, problems))
    defaults = {"priority": getattr(settings, "DISPATCH_PRIORITY", None),
                "route": getattr(settings, "DISPATCH_ROUTE", None)}  # fmt: skip
    for name, value in defaults.items():
        if value is not None:
            data.setdefault(name, value)
    return data, problems


def _same_addresses(problems: dict[str, str], field: str, given: list[str], header: Any) -> None:
    """A header that extra_headers changed may not tell another story than the envelope Django sends to."""
    written = header if isinstance(header, list) else [header] if header else []
    try:
        same = [parse_address(a).addr_spec.casefold() for a in given] == [
            parse_address(a).addr_spec.casefold() for a in written
        ]
    except ValueError:
        return  # the address itself is wrong: validation names it
    if not same:
        problems[f"headers.{field.capitalize()}"] = (
            f"differs from the message's {'from_email' if field == 'from' else field}: dispatcher writes "
            "this header from the addresses it sends to"
        )


def _options(message: EmailMessage, problems: dict[str, str]) -> dict[str, Any]:
    options = getattr(message, "dispatch", None)
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        problems["dispatch"] = f"must be a dict of {', '.join(sorted(DISPATCH_OPTIONS))}"
        return {}
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name not in DISPATCH_OPTIONS:
            problems[f"dispatch.{name}"] = f"unknown option (known: {', '.join(sorted(DISPATCH_OPTIONS))})"
        elif isinstance(value, datetime):
            out[name] = value.isoformat()
        else:
            out[name] = value
    return out


def validate_all(
    messages: Sequence[EmailMessage], validate: Callable[[Mapping[str, Any]], Mail]
) -> list[Mail]:
    """Every message with recipients, validated; one ``ValidationError`` naming each problem by the
    message's index in ``messages`` (``[2].to[0]``). Messages without recipients are skipped, as Django's
    SMTP backend skips them."""
    mails: list[Mail] = []
    problems: dict[str, str] = {}
    for index, message in enumerate(messages):
        if not message.recipients():
            continue
        checked = _checked(message, validate)
        if isinstance(checked, Mail):
            mails.append(checked)
        else:
            problems.update({f"[{index}].{field}": problem for field, problem in checked.items()})
    if problems:
        raise ValidationError(problems)
    return mails


def _checked(message: EmailMessage, validate: Callable[[Mapping[str, Any]], Mail]) -> Mail | dict[str, str]:
    """The validated mail, or every problem found reading and validating it."""
    try:
        data, problems = mail_of(message)
    except BadHeaderError:
        raise  # what Django's SMTP backend raises too, whatever fail_silently says: apps catch it
    except (ValueError, TypeError) as exc:  # Django's other refusals while rendering
        return {"mail": f"Django could not render it: {exc}"}
    if not data:
        return problems
    try:
        mail = validate(data)
    except ValidationError as exc:
        return {**problems, **exc.problems}
    return problems or mail


class EmailBackend(BaseEmailBackend):  # type: ignore[misc]
    """Enqueues every message of one ``send_messages`` call in one Redis transaction."""

    def __init__(self, fail_silently: bool = False, **kwargs: Any) -> None:
        super().__init__(fail_silently=fail_silently, **kwargs)
        url = getattr(settings, "DISPATCH_REDIS_URL", None) or getattr(settings, "REDIS_URL", None)
        self.redis_url = str(url or DEFAULT_REDIS_URL)

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        """The number of messages enqueued (a duplicate of an idempotency key counts: it is queued once)."""
        messages = list(email_messages or [])
        if not messages:
            return 0
        producer = Producer(redis_client(self.redis_url))
        try:
            mails = validate_all(messages, producer.validate)
            results = producer.enqueue_valid(mails) if mails else []
        except DispatcherError as exc:
            return self._failed(exc, len(messages))
        conflicts = {
            f"[{index}].key": str(result) for index, result in enumerate(results)
            if isinstance(result, IdempotencyConflict)
        }  # fmt: skip
        if conflicts and not self.fail_silently:
            raise ValidationError(conflicts)
        return len(results) - len(conflicts)

    def _failed(self, exc: DispatcherError, count: int) -> int:
        if not self.fail_silently:
            raise exc
        log.error("django_mail_not_enqueued", messages=count, error=str(exc))
        return 0


class TestBackend(BaseEmailBackend):  # type: ignore[misc]
    """Like Django's ``locmem`` backend, after the checks ``EmailBackend`` makes: messages go to
    ``django.core.mail.outbox`` and the validated mails to :func:`dispatcher.testing.outbox`. No Redis."""

    __test__ = False  # not a pytest class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not hasattr(django_mail, "outbox"):
            django_mail.outbox = []

    def send_messages(self, email_messages: Sequence[EmailMessage]) -> int:
        messages = list(email_messages or [])
        try:
            mails = validate_all(messages, lambda data: validated(data, build=False))
        except ValidationError:
            if not self.fail_silently:
                raise
            return 0
        for message, mail in zip([m for m in messages if m.recipients()], mails, strict=True):
            message.message()  # what locmem does: the message must render
            django_mail.outbox.append(message)
            testing.record(mail)
        return len(mails)
