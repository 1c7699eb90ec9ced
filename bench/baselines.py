"""rq job functions for the two baselines the dispatcher has to beat.

(a) ``smtplib_new_connection`` — run by rq's default forking ``Worker``: a new connection per job
    (connect, EHLO, MAIL, RCPT, DATA, QUIT). A connection kept in the work-horse would die with it.
(b) ``smtplib_kept_connection`` — run by ``SimpleWorker`` (no fork): one ``smtplib.SMTP`` in a module
    global, reused across jobs; reconnect once when it turns out to be dead.

Both render the message in the job from a JSON-safe dict (as an app would enqueue it), so MIME rendering
is part of the per-message cost, as it will be for the dispatcher. Jobs use rq's JSONSerializer.
"""

from __future__ import annotations

import smtplib
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from typing import Any

_BODY_LINE = "This is line {i:02d} of a benchmark message from the dispatcher bench, about 1 KB in total.\n"


def make_mail(seq: int, run_id: str) -> dict[str, Any]:
    """A JSON-safe mail as an application would enqueue it (~1 KB once rendered)."""
    return {
        "from": "Bench Sender <sender@bench.example>",
        "to": [f"Recipient {seq} <rcpt{seq}@bench.example>"],
        "subject": f"Benchmark message {seq} of run {run_id}",
        "text": "".join(_BODY_LINE.format(i=i) for i in range(9)),
        "headers": {"X-Bench-Run": run_id, "X-Bench-Seq": str(seq)},
    }


def noop() -> None:
    """A job that does nothing: rq's enqueue_many of these is the floor for bulk enqueue (issue 15)."""


def render(mail: dict[str, Any]) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = mail["from"]
    msg["To"] = ", ".join(mail["to"])
    msg["Subject"] = mail["subject"]
    msg["Date"] = formatdate(localtime=False)
    msg["Message-ID"] = make_msgid(domain="bench.example")
    for name, value in mail.get("headers", {}).items():
        msg[name] = value
    msg.set_content(mail["text"])
    return msg


def smtplib_new_connection(host: str, port: int, mail: dict[str, Any]) -> str:
    """Baseline (a): open, send one message, QUIT."""
    msg = render(mail)
    with smtplib.SMTP(host, port, timeout=30) as smtp:
        smtp.send_message(msg)
    return str(msg["Message-ID"])


_kept: smtplib.SMTP | None = None


def _connect(host: str, port: int) -> smtplib.SMTP:
    global _kept
    _kept = smtplib.SMTP(host, port, timeout=30)
    return _kept


def smtplib_kept_connection(host: str, port: int, mail: dict[str, Any]) -> str:
    """Baseline (b): reuse one module-global connection; on a dead one reconnect and try once more.

    No NOOP probe before each message: that would cost a round trip per message, which naive code
    usually does not pay; instead a send on a dead socket raises and we reconnect.
    """
    msg = render(mail)
    smtp = _kept if _kept is not None else _connect(host, port)
    try:
        smtp.send_message(msg)
    except (smtplib.SMTPServerDisconnected, ConnectionError):
        smtp.close()
        _connect(host, port).send_message(msg)
    return str(msg["Message-ID"])
