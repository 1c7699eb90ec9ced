"""``dispatcher.logs``: configuring again reaches loggers cached before; the cheap processors give what
structlog's own would (issue 15: structlog cheaper per mail, same fields)."""

from __future__ import annotations

import datetime
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import structlog
from structlog.contextvars import bind_contextvars, clear_contextvars, merge_contextvars

from dispatcher.logs import configure_logging, merge_context, redact_secrets, render_json, reset_logging

ROOT = Path(__file__).resolve().parents[1]


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_configuring_again_reaches_a_logger_cached_before() -> None:
    logger = structlog.get_logger("tests.logs")
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", json=True, stream=first)
    logger.info("cached_now")  # cache_logger_on_first_use: this logger is assembled here, once
    configure_logging("WARNING", json=True, stream=second)
    logger.info("below_the_new_level")
    logger.warning("at_the_new_level")
    assert [e["event"] for e in _lines(first)] == ["cached_now"]
    assert [e["event"] for e in _lines(second)] == ["at_the_new_level"]
    configure_logging("DEBUG", json=True, stream=first)
    logger.debug("debug_now")
    assert [e["event"] for e in _lines(first)] == ["cached_now", "debug_now"]
    # Back to structlog's defaults: every level, and capture_logs sees what the cached logger makes.
    reset_logging()
    with structlog.testing.capture_logs() as logs:
        logger.debug("after_reset", x=1)
    assert logs == [{"event": "after_reset", "x": 1, "log_level": "debug"}]


def test_a_line_has_every_field_of_structlogs_own_chain() -> None:
    out = io.StringIO()
    configure_logging("INFO", json=True, stream=out)
    bind_contextvars(job_id="j-1", attempt=2)
    try:
        structlog.get_logger("tests.logs").info("mail_delivered", total_ms=4.2, password="hunter2")
    finally:
        clear_contextvars()
    (line,) = _lines(out)
    stamp = datetime.datetime.fromisoformat(line.pop("timestamp"))
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.UTC) - stamp).total_seconds()) < 60
    assert line == {
        "event": "mail_delivered",
        "total_ms": 4.2,
        "password": "<redacted>",
        "job_id": "j-1",
        "attempt": 2,
        "level": "info",
    }


def test_merge_context_reads_what_structlogs_merge_reads() -> None:
    try:
        bind_contextvars(a=1, b="two", gone=3)
        clear_contextvars()  # leaves its variables behind, holding ``...``
        bind_contextvars(a=1, b="two", c=[3])
        ours = merge_context(None, "info", {"event": "e", "a": "own"})
        theirs = merge_contextvars(None, "info", {"event": "e", "a": "own"})
    finally:
        clear_contextvars()
    assert ours == theirs == {"event": "e", "a": "own", "b": "two", "c": [3]}


class _Odd:
    def __structlog__(self) -> str:
        return "odd!"


def test_render_json_is_structlogs_json_renderer() -> None:
    event = {"event": "e", "n": 1.5, "odd": _Odd(), "set": {1}, "text": "Grüße", "none": None}
    assert render_json(None, "info", dict(event)) == structlog.processors.JSONRenderer()(
        None, "info", dict(event)
    )


def test_redaction_only_touches_secret_fields() -> None:
    event = {"event": "e", "token": "t", "user": "u"}
    assert redact_secrets(None, "info", event) == {"event": "e", "token": "<redacted>", "user": "u"}
    assert redact_secrets(None, "info", {"event": "e"}) == {"event": "e"}


SIGNAL_INSIDE_A_BLOCKED_WRITE = r"""
import os, signal, sys, threading
from dispatcher.logs import _OUTPUT
read_end, write_end = os.pipe()
_OUTPUT.stream = os.fdopen(write_end, "w")
blocked, received = threading.Event(), []
signal.signal(signal.SIGUSR1, lambda signum, frame: _OUTPUT.msg("from the handler"))

def reader():
    blocked.wait()
    os.kill(os.getpid(), signal.SIGUSR1)  # pending while the main thread is blocked in flush (pipe full)
    while chunk := os.read(read_end, 1 << 20):
        received.append(chunk)

threading.Thread(target=reader, daemon=True).start()
threading.Timer(0.3, blocked.set).start()
_OUTPUT.msg("x" * (1 << 20))  # larger than the pipe's buffer: the write blocks until the reader reads
_OUTPUT.msg("last")
_OUTPUT.stream.close()
while threading.active_count() > 1 and not b"".join(received).endswith(b"last\n"):
    threading.Event().wait(0.01)
print(b"".join(received).split(b"\n")[1:])
"""


def test_a_signal_handler_logging_inside_a_blocked_write_waits_its_turn() -> None:
    """A stop signal's handler logs while the main thread's log write waits on a full pipe: the handler's
    line goes out after the interrupted one, whole, and the interrupted write does not raise."""
    script = [sys.executable, "-c", SIGNAL_INSIDE_A_BLOCKED_WRITE]
    done = subprocess.run(script, cwd=ROOT, capture_output=True, timeout=30, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[b'from the handler', b'last', b'']", done.stdout
