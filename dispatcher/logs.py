"""One logging configuration for worker, CLI and dashboard (structlog's recommended shape).

A shared processor chain starting with ``merge_contextvars``; JSON lines when stderr is not a TTY,
the console renderer when it is; stdlib records (rq's own) rendered through ``ProcessorFormatter`` so
they come out in the same format. Jobs bind ``job_id``, ``message_id``… with ``bind_contextvars``.

structlog's own events skip the stdlib machinery (a filtering bound logger writing straight to the
stream): the worker logs every SMTP command and reply, and the stdlib path costs several times more CPU.
rq's per-job INFO chatter is held at ``DISPATCH_RQ_LOG_LEVEL`` (WARNING by default); our
``mail_delivered`` / ``mail_deferred`` / ``mail_failed`` events tell the same story with more fields.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import Processor

SECRET_KEYS = frozenset({"password", "secret", "token", "authorization", "credentials"})


def redact_secrets(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: a field named like a secret never leaves the process in clear."""
    for key in event.keys() & SECRET_KEYS:
        event[key] = "<redacted>"
    return event


def configure_logging(
    level: str | None = None, *, json: bool | None = None, stream: TextIO | None = None
) -> None:
    """Configure structlog and the stdlib root logger. ``DISPATCH_LOG_LEVEL`` / ``DISPATCH_LOG_FORMAT``
    (json | console) override the defaults (INFO; JSON unless the stream is a TTY)."""
    stream = stream or sys.stderr
    level_name = (level or os.environ.get("DISPATCH_LOG_LEVEL") or "INFO").upper()
    numeric = logging.getLevelName(level_name)
    if not isinstance(numeric, int):
        raise ValueError(f"DISPATCH_LOG_LEVEL={level_name!r} is not a log level")
    if json is None:
        fmt = os.environ.get("DISPATCH_LOG_FORMAT", "").lower()
        json = fmt == "json" or (fmt != "console" and not stream.isatty())
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        redact_secrets,
    ]
    renderer: Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    rq_level = os.environ.get("DISPATCH_RQ_LOG_LEVEL", "WARNING").upper()
    logging.getLogger("rq").setLevel(max(numeric, logging.getLevelName(rq_level)))
