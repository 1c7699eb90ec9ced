"""The Flask extension: ``dispatcher = Dispatcher(app)`` (or ``Dispatcher()`` then ``init_app(app)``), then
``dispatcher.send({...})`` — or ``dispatcher.send(Message(...))``, a Flask-Mail ``Message`` look-alike — in
a request enqueues with the current app's configuration:

``DISPATCH_REDIS_URL`` (default ``REDIS_URL``), ``DISPATCH_DEFAULT_SENDER`` (default
``MAIL_DEFAULT_SENDER``), ``DISPATCH_PRIORITY``, ``DISPATCH_ROUTE``, ``DISPATCH_TEMPLATES_DIR``.

The app's state lives in ``app.extensions["dispatcher"]``, so one extension object serves any number of
apps. This module (with the dashboard) is where dispatcher meets Flask; ``import dispatcher`` never
loads it.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

from flask import Flask, current_app

from dispatcher.errors import ConfigurationError, IdempotencyConflict, ValidationError
from dispatcher.queue.producer import Enqueued, Producer, connect
from dispatcher.settings import DEFAULT_REDIS_URL

EXTENSION = "dispatcher"

Address = str | tuple[str, str]


@dataclass(frozen=True, slots=True)
class _AppState:
    producer: Producer
    defaults: Mapping[str, str]


class Dispatcher:
    """Enqueue mail from Flask views with the app's configuration."""

    def __init__(self, app: Flask | None = None) -> None:
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        config = app.config
        url = config.get("DISPATCH_REDIS_URL") or config.get("REDIS_URL") or DEFAULT_REDIS_URL
        defaults = {
            "from": _address(config.get("DISPATCH_DEFAULT_SENDER") or config.get("MAIL_DEFAULT_SENDER")),
            "priority": config.get("DISPATCH_PRIORITY"),
            "route": config.get("DISPATCH_ROUTE"),
        }
        producer = Producer(connect(str(url)), templates_dir=config.get("DISPATCH_TEMPLATES_DIR"))
        state = _AppState(producer, {name: value for name, value in defaults.items() if value})
        app.extensions[EXTENSION] = state

    def send(self, mail: Mapping[str, Any] | Message) -> Enqueued:
        """Validate and enqueue one mail (the app's defaults filled in); ``ValidationError`` names every
        bad field and nothing is stored."""
        state = _state()
        return state.producer.enqueue(_with_defaults(mail, state))

    def send_many(self, mails: Iterable[Mapping[str, Any] | Message]) -> list[Enqueued]:
        """All validated first, then enqueued in one Redis transaction; any invalid item raises one
        ``ValidationError`` naming each problem by the item's index (``[2].to[0]``) and nothing is stored."""
        state = _state()
        problems: dict[str, str] = {}
        valid = []
        for index, mail in enumerate(mails):
            try:
                valid.append(state.producer.validate(_with_defaults(mail, state)))
            except ValidationError as exc:
                problems.update({f"[{index}].{field}": problem for field, problem in exc.problems.items()})
        if problems:
            raise ValidationError(problems)
        results = state.producer.enqueue_valid(valid)
        conflicts = {
            f"[{index}].key": str(result) for index, result in enumerate(results)
            if isinstance(result, IdempotencyConflict)
        }  # fmt: skip
        if conflicts:
            raise ValidationError(conflicts)
        return [result for result in results if isinstance(result, Enqueued)]

    def send_message(self, *args: Any, **kwargs: Any) -> Enqueued:
        """Flask-Mail's shortcut: ``send_message(subject=..., recipients=[...], body=...)``."""
        return self.send(Message(*args, **kwargs))


def _state() -> _AppState:
    state = current_app.extensions.get(EXTENSION)
    if not isinstance(state, _AppState):
        raise ConfigurationError("dispatcher.flask.Dispatcher was not initialised for this app (init_app)")
    return state


def _with_defaults(mail: Mapping[str, Any] | Message, state: _AppState) -> dict[str, Any]:
    data = mail.to_mail() if isinstance(mail, Message) else dict(mail)
    for name, value in state.defaults.items():
        if data.get(name) is None:
            data[name] = value
    return data


def _address(value: Address | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    name, addr = value
    return f"{name} <{addr}>" if name else addr


class Message:
    """Flask-Mail's ``Message``, enough of it to move a Flask-Mail app over: the same constructor
    arguments, ``attach`` and ``add_recipient``; addresses may be ``"a@b"``, ``"Name <a@b>"`` or
    ``("Name", "a@b")``. ``dispatch`` takes the mail's queue fields (``key``, ``priority``, ``send_at``,
    ``route``, ``metadata``)."""

    def __init__(
        self,
        subject: str = "",
        recipients: Sequence[Address] | None = None,
        body: str | None = None,
        html: str | None = None,
        sender: Address | None = None,
        cc: Sequence[Address] | None = None,
        bcc: Sequence[Address] | None = None,
        attachments: Sequence[Attachment] | None = None,
        reply_to: Address | None = None,
        date: str | float | None = None,
        extra_headers: Mapping[str, str] | None = None,
        dispatch: Mapping[str, Any] | None = None,
    ) -> None:
        self.subject = subject
        self.recipients = list(recipients or [])
        self.body = body
        self.html = html
        self.sender = sender
        self.cc = list(cc or [])
        self.bcc = list(bcc or [])
        self.attachments = list(attachments or [])
        self.reply_to = reply_to
        self.date = date
        self.extra_headers = dict(extra_headers or {})
        self.dispatch = dict(dispatch or {})

    def add_recipient(self, recipient: Address) -> None:
        self.recipients.append(recipient)

    def attach(
        self,
        filename: str | None = None,
        content_type: str | None = None,
        data: bytes | str | None = None,
        disposition: str | None = None,
        headers: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
    ) -> None:
        self.attachments.append(Attachment(filename, content_type, data, disposition, dict(headers or {})))

    def to_mail(self) -> dict[str, Any]:
        """The JSON mail (not yet validated: the producer names what is wrong)."""
        fields: dict[str, Any] = {
            "from": _address(self.sender),
            "to": [_address(a) for a in self.recipients],
            "cc": [_address(a) for a in self.cc],
            "bcc": [_address(a) for a in self.bcc],
            "reply_to": _address(self.reply_to),
            "subject": self.subject,
            "text": self.body,
            "html": self.html,
            "attachments": [a.to_mail() for a in self.attachments],
            "headers": self.extra_headers,
            "date": format_datetime(datetime.fromtimestamp(self.date, UTC))
            if isinstance(self.date, int | float) else self.date,  # Flask-Mail's is a Unix time
        }
        mail = {name: value for name, value in fields.items() if value not in (None, [], {})}
        mail.update(self.dispatch)
        return mail


@dataclass
class Attachment:
    """Flask-Mail's ``Attachment``; a ``Content-ID`` in ``headers`` makes it an inline (``cid:``) part."""

    filename: str | None = None
    content_type: str | None = None
    data: bytes | str | None = None
    disposition: str | None = None
    headers: Mapping[str, str] | None = None

    def to_mail(self) -> dict[str, Any]:
        content = self.data.encode("utf-8") if isinstance(self.data, str) else self.data
        out: dict[str, Any] = {
            "filename": self.filename,
            "content_type": self.content_type or "application/octet-stream",
            "content": None if content is None else base64.b64encode(content).decode("ascii"),
            "disposition": self.disposition,
        }
        if isinstance(self.data, str) and out["content_type"].startswith("text/"):
            out["charset"] = "utf-8"
        for name, value in (self.headers or {}).items():
            out["content_id" if name.lower() == "content-id" else f"header {name}"] = value
        return {name: value for name, value in out.items() if value is not None}
