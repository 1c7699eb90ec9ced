"""One logging configuration for worker, CLI and dashboard (structlog's recommended shape).

A shared processor chain starting with the context merge; JSON lines when stderr is not a TTY, the
console renderer when it is; stdlib records (rq's own) rendered through ``ProcessorFormatter`` so they
come out in the same format. Jobs bind ``job_id``, ``message_id``… with ``bind_contextvars``.

structlog's own events skip the stdlib machinery (a filtering bound logger writing straight to the
stream): an event below the level is a method that returns at once, before any processor runs. rq's
per-job INFO chatter is held at ``DISPATCH_RQ_LOG_LEVEL`` (WARNING by default); our ``mail_delivered`` /
``mail_deferred`` / ``mail_failed`` events tell the same story with more fields.

**Configuring again reaches every logger.** Loggers are cached on first use (an uncached module logger
assembles a bound logger on every call: several µs per event). A cached logger keeps the objects it was
built from — its processor list, wrapper class and output — so ``configure_logging`` never swaps them:
there is one of each (``_CHAIN``, ``LevelledLogger``, ``_OUTPUT``) and each call changes them in place.
A second ``configure_logging`` (the CLI's WARNING after a test's defaults) and ``reset_logging`` (back
to structlog's defaults, as a test that configures nothing expects) so reach loggers cached before
them, and ``structlog.testing.capture_logs`` (which swaps the contents of the configured processor list)
captures every event at the level in force.

Cost per event (``python -m bench.log_events``): the chain's own steps are cheap versions of structlog's
— the context merge reads our context variables directly instead of copying and scanning the whole
context, the timestamp formats its second once per second — and the JSON encoder is built once.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor

SECRET_KEYS = frozenset({"password", "secret", "token", "authorization", "credentials"})


def redact_secrets(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Last line of defence: a field named like a secret never leaves the process in clear."""
    if not SECRET_KEYS.isdisjoint(event):
        for key in event.keys() & SECRET_KEYS:
            event[key] = "<redacted>"
    return event


_STRUCTLOG_VARS: dict[str, contextvars.ContextVar[Any]] | None = getattr(
    structlog.contextvars, "_CONTEXT_VARS", None
)
_PREFIX = len(structlog.contextvars.STRUCTLOG_KEY_PREFIX)


def merge_context(logger: Any, method: str, event: EventDict) -> EventDict:
    """``structlog.contextvars.merge_contextvars``, without copying and scanning the whole context: the
    variables ``bind_contextvars`` made are read one by one (a cleared one holds ``...``). Falls back to
    structlog's own where its registry of variables is not there (tests compare the two)."""
    if _STRUCTLOG_VARS is None:
        return structlog.contextvars.merge_contextvars(logger, method, event)
    for name, var in tuple(_STRUCTLOG_VARS.items()):
        value = var.get(Ellipsis)
        if value is not Ellipsis:
            event.setdefault(name[_PREFIX:], value)
    return event


class _UtcStamp:
    """``timestamp`` as ISO 8601 UTC with microseconds (``2026-11-27T15:55:01.204211Z``); the date and
    time of day are formatted once per second, not per event."""

    def __init__(self) -> None:
        self._cached = (-1, "")  # (second, its text): one tuple, so threads never pair them wrongly

    def __call__(self, logger: Any, method: str, event: EventDict) -> EventDict:
        now = time.time()
        second = int(now)
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._cached = (second, prefix)
        event["timestamp"] = f"{prefix}.{int((now - second) * 1_000_000):06d}Z"
        return event


def _json_fallback(value: Any) -> Any:
    """What JSON cannot encode: its ``__structlog__()`` if it has one, else its ``repr`` (structlog's)."""
    own = getattr(value, "__structlog__", None)
    return own() if callable(own) else repr(value)


_encode = json.JSONEncoder(default=_json_fallback).encode


def render_json(logger: Any, method: str, event: EventDict) -> str:
    """structlog's ``JSONRenderer`` output (same encoder options, same fallback for odd values), with the
    encoder built once instead of on every event."""
    return _encode(event)


class _Output:
    """The one output every cached logger writes to: a line per event, flushed, on the stream in force
    (``None``: ``sys.stdout`` at the time of writing, as structlog's default ``PrintLogger``).

    A signal handler that logs (the supervisor's ``pool_stopping``, rq's warm-stop line) runs in the main
    thread between two bytecodes — possibly inside this very ``msg``, even while its ``flush`` waits on a
    full pipe. A plain lock held by the interrupted frame would never be released (a pool told to stop the
    moment it had written ``pool_started`` hung there), and writing from inside the interrupted write makes
    the stream raise (``RuntimeError: reentrant call``). So the lock is reentrant and a line logged while
    this thread is writing waits in ``_pending``: the interrupted call writes it after its own."""

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self._lock = threading.RLock()
        self._writer: int | None = None
        """The thread writing right now (holding the lock), while it writes."""
        self._pending: list[str] = []

    def msg(self, message: str) -> None:
        me = threading.get_ident()
        if self._writer == me:  # a signal handler, inside this thread's write
            self._pending.append(message)
            return
        with self._lock:
            stream = sys.stdout if self.stream is None else self.stream
            self._writer = me
            try:
                self._write(stream, message)
                while self._pending:
                    self._write(stream, self._pending.pop(0))
            finally:
                self._writer = None
            while self._pending:  # appended after the last look, before _writer was cleared
                self._write(stream, self._pending.pop(0))

    @staticmethod
    def _write(stream: TextIO, message: str) -> None:
        stream.write(message + "\n")
        stream.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_OUTPUT = _Output()


def _output_factory(*args: Any) -> _Output:
    return _OUTPUT


class LevelledLogger(structlog.make_filtering_bound_logger(logging.NOTSET)):  # type: ignore[misc]
    """The one wrapper class of every logger: ``make_filtering_bound_logger``'s methods for the level in
    force, installed on this class by ``_set_level`` so loggers cached earlier follow a new level."""


def _set_level(level: int) -> None:
    filtering = structlog.make_filtering_bound_logger(level)
    for name, value in vars(filtering).items():
        if not name.startswith("__"):
            setattr(LevelledLogger, name, value)


_CHAIN: list[Processor] = []


def _install(processors: list[Processor], level: int, stream: TextIO | None) -> None:
    """Point the single chain, wrapper class and output at a new configuration, in place."""
    _CHAIN[:] = processors
    _set_level(level)
    _OUTPUT.stream = stream
    structlog.configure(
        processors=_CHAIN,
        logger_factory=_output_factory,
        wrapper_class=LevelledLogger,
        cache_logger_on_first_use=True,
    )


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
    shared: list[Processor] = [merge_context, structlog.processors.add_log_level, _UtcStamp(), redact_secrets]
    renderer: Processor = render_json if json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    _install([*shared, structlog.processors.format_exc_info, renderer], numeric, stream)
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


def reset_logging() -> None:
    """structlog's defaults again — every level, its default processors, stdout — reaching loggers that
    an earlier ``configure_logging`` cached (``structlog.reset_defaults`` alone would leave those on the
    old level and chain). The stdlib root logger is left as it is."""
    structlog.reset_defaults()
    _install(list(structlog.get_config()["processors"]), logging.NOTSET, None)
