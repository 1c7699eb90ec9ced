"""What our logs cost: µs per event through the configured processor chain, events and µs per mail.

``python -m bench.log_events [--events 20000] [--mails 300] [--no-worker]``

1. **Per event**: ``configure_logging(json=True)`` writing to ``/dev/null``, a job's context bound (the
   six fields ``Attempt.bind`` binds), then ``--events`` calls of each typical event — a command, a
   reply, a ``mail_delivered`` summary, an ``smtp_transaction`` carrying nine command/reply lines, and
   a DEBUG event while the level is INFO (filtered before the chain runs). Then each processor of the
   chain alone on a typical event, to see where the time goes.
2. **Per delivered mail**: a real ``worker.py --burst`` (one process, a private Redis, the counting bench
   sink) delivers ``--mails`` mails at ``DISPATCH_LOG_LEVEL=DEBUG``, so every event any call site makes is
   in its output; the events are counted per delivered mail (all of them, and those at INFO or above:
   what a worker writes by default). Then every event of that run is replayed through a logger configured
   at INFO to ``/dev/null`` — the same calls, fields and context — and the replay's time divided by the
   mails delivered: once only the events written at INFO, once with every DEBUG call too (made and
   filtered: an upper bound where a call site skips them, as the transcript does at INFO). A second
   run at INFO gives the worker's whole CPU time per mail, for scale.

Timings are CPU time of this process (``time.process_time``: a shared machine's other work is not
counted), best of 7 (per event) or 15 (per mail): read them for proportions and before/after in one
run, not as absolutes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
from redis import Redis

from dispatcher import logs
from dispatcher.logs import configure_logging

CONTEXT = {
    "job_id": "mail-6f1c2e0b9d8a4c1e",
    "send_id": "mail-6f1c2e0b9d8a4c1e",
    "message_id": "<179512345678.4242.8d1f@example.com>",
    "attempt": 1,
    "route": "default",
    "worker": "26c29c0e5b0a4f7d",
}
CONTEXT_KEYS = frozenset(CONTEXT)
RENDERED_KEYS = frozenset({"timestamp", "level", "log_level", "logger"})
"""Fields the chain adds: not passed again when a captured event is replayed."""

LINES = [
    "rset > RSET",
    "mail > MAIL FROM:<app@example.com> SIZE=1834",
    "rcpt > RCPT TO:<user3@example.org>",
    "bdat > BDAT 1834 LAST",
    "data_block > <1834 bytes of message data>",
    "rset < 250 2.0.0 OK (0.21 ms)",
    "mail < 250 2.1.0 OK (0.22 ms)",
    "rcpt < 250 2.1.5 OK (0.22 ms)",
    "bdat < 250 2.0.0 OK queued (0.32 ms)",
]
"""An ``smtp_transaction``'s lines for one streamed message (CHUNKING)."""


def _events(logger: Any) -> dict[str, Callable[[], None]]:
    """The typical events, as the call sites make them."""
    conn = "008b3a-27171-1"
    return {
        "smtp_command (INFO)": lambda: logger.info(
            "smtp_command", conn_id=conn, stage="rcpt", command="RCPT TO:<user3@example.org>", tls=None
        ),
        "smtp_reply (INFO)": lambda: logger.info(
            "smtp_reply", conn_id=conn, stage="rcpt", code=250, enhanced="2.1.5", text="2.1.5 OK", ms=0.22,
            tls=None,
        ),
        "mail_delivered (INFO)": lambda: logger.info(
            "mail_delivered", recipients={"user3@example.org": "accepted"}, total_ms=4.2, conn_id=conn,
            next_attempt_at=None, reason=None,
        ),
        "smtp_transaction, 9 lines (INFO)": lambda: logger.info(
            "smtp_transaction", conn_id=conn, tls=None, lines=LINES, ms=0.9
        ),
        "smtp_command (DEBUG, filtered)": lambda: logger.debug(
            "smtp_command", conn_id=conn, stage="rcpt", command="RCPT TO:<user3@example.org>", tls=None
        ),
    }  # fmt: skip


def _best_us(call: Callable[[], object], n: int, rounds: int = 7) -> float:
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            call()
        best = min(best, time.process_time() - t0)
    return best / n * 1e6


@contextlib.contextmanager
def _configured(level: str = "INFO") -> Iterator[None]:
    """Our real configuration, writing to /dev/null; structlog's defaults again afterwards."""
    with open(os.devnull, "w") as devnull:
        configure_logging(level, json=True, stream=devnull)
        try:
            yield
        finally:
            structlog.contextvars.clear_contextvars()
            getattr(logs, "reset_logging", structlog.reset_defaults)()  # (older trees: no reset_logging)
            logging.getLogger().handlers[:] = []


def per_event(n: int) -> None:
    print(f"--- µs per event through the configured chain (JSON, /dev/null, best of 7 x {n}) ---")
    with _configured():
        structlog.contextvars.bind_contextvars(**CONTEXT)
        logger = structlog.get_logger("dispatcher.bench")
        for name, call in _events(logger).items():
            print(f"{name:40s} {_best_us(call, n):7.2f} µs")
        print("--- µs per processor alone, on a mail_delivered event ---")
        processors = structlog.get_config()["processors"]
        sample = {"event": "mail_delivered", "recipients": {"user3@example.org": "accepted"}, "total_ms": 4.2,
                  "conn_id": "008b3a-27171-1", "next_attempt_at": None, "reason": None}  # fmt: skip
        rendered = dict(sample, **CONTEXT, level="info", timestamp="2026-11-27T15:55:01.204211Z")
        for proc in processors:
            name = getattr(proc, "__name__", type(proc).__name__)
            is_renderer = proc is processors[-1]
            base = rendered if is_renderer else sample
            print(f"{name:40s} {_best_us(functools.partial(_apply, proc, base), n):7.2f} µs")
        print(f"{'(dict copy alone)':40s} {_best_us(lambda: dict(sample), n):7.2f} µs")


def _apply(processor: Any, event: dict[str, Any]) -> object:
    return processor(None, "info", dict(event))


def _run_worker(mails: int, tmp: Path, level: str) -> tuple[list[dict[str, Any]], int, float]:
    """Every event of one worker delivering ``mails`` at ``level``, how many the sink got, and the
    worker's CPU seconds (user + system)."""
    import dispatcher
    from bench.redis_server import PrivateRedis
    from bench.scenarios import PROJECT_ROOT, BenchEnv, dispatcher_mail
    from bench.sink import SinkProcess

    with PrivateRedis() as redis_server, SinkProcess(module="bench.chunking_sink") as sink:
        env = BenchEnv(redis_server.url, "127.0.0.1", sink.port, "logs", mails)
        dispatcher.enqueue_many([dispatcher_mail(i, env) for i in range(mails)],
                                connection=Redis.from_url(redis_server.url))  # fmt: skip
        log = tmp / f"worker-{level}.log"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with log.open("w") as err:
            proc = subprocess.run(
                [sys.executable, str(PROJECT_ROOT / "worker.py"), "--burst"],
                env={**env.process_env(), "PATH": "/usr/bin:/bin", "DISPATCH_LOG_LEVEL": level,
                     "DISPATCH_LOG_FORMAT": "json"},
                cwd=PROJECT_ROOT, timeout=300, stdout=subprocess.DEVNULL, stderr=err, check=False,
            )  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        delivered = sink.stats().messages
    if proc.returncode:
        raise SystemExit(f"worker failed (rc={proc.returncode}): {log.read_text()[-2000:]}")
    events = []
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            events.append(json.loads(line))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return events, delivered, cpu


def _replay(events: list[dict[str, Any]], logger: Any) -> Callable[[], None]:
    """A function making the same calls as the run did, binding each event's context as the jobs do."""
    calls: list[tuple[dict[str, Any] | None, Callable[..., Any], str, dict[str, Any]]] = []
    bound: dict[str, Any] = {}
    for event in events:
        if "logger" in event:  # a stdlib record (rq's): not one of our events
            continue
        context = {k: v for k, v in event.items() if k in CONTEXT_KEYS}
        fields = {k: v for k, v in event.items() if k not in CONTEXT_KEYS | RENDERED_KEYS | {"event"}}
        method = getattr(logger, event.get("level", "info"))
        calls.append((context if context != bound else None, method, event["event"], fields))
        bound = context

    def replay() -> None:
        for context, method, name, fields in calls:
            if context is not None:
                structlog.contextvars.clear_contextvars()
                structlog.contextvars.bind_contextvars(**context)
            method(name, **fields)

    return replay


def per_mail(mails: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-logs-") as tmp:
        events, delivered, _ = _run_worker(mails, Path(tmp), "DEBUG")
        _, delivered_at_info, cpu = _run_worker(mails, Path(tmp), "INFO")
    ours = [e for e in events if "logger" not in e]
    if not delivered:
        raise SystemExit("the worker delivered nothing")
    info = [e for e in ours if e.get("level") != "debug"]
    print(f"--- a worker delivering {delivered}/{mails} mails (chunking sink, DISPATCH_LOG_LEVEL=DEBUG) ---")
    print(f"events per delivered mail: {len(ours) / delivered:.2f} made at DEBUG, "
          f"{len(info) / delivered:.2f} at INFO or above (written by default); "
          f"{len(events) - len(ours)} stdlib records")  # fmt: skip
    counts = collections.Counter((e.get("level", "?"), e["event"]) for e in ours)
    for (level, name), count in counts.most_common(8):
        print(f"  {count / delivered:6.2f} per mail  {level:7s} {name}")
    print("µs of logging per delivered mail (the run's events replayed through the chain at INFO):")
    with _configured():
        for label, chosen in (("the events written at INFO", info),
                              ("those + every DEBUG call made and filtered", ours)):  # fmt: skip
            replay = _replay(chosen, structlog.get_logger("dispatcher.bench"))
            replay()  # warm: the loggers are cached on first use
            best = min(_timed(replay) for _ in range(15))
            base = min(_timed(_replay(chosen, _Nothing())) for _ in range(15))
            print(f"  {label:45s} {(best - base) / delivered * 1e6:6.1f} µs")
    print(f"worker CPU per delivered mail at INFO (all of it, not only logs; {delivered_at_info} delivered): "
          f"{cpu / max(delivered_at_info, 1) * 1e3:.3f} ms")  # fmt: skip


def _timed(call: Callable[[], None]) -> float:
    t0 = time.process_time()
    call()
    return time.process_time() - t0


class _Nothing:
    """A logger whose every method does nothing: the replay loop's own cost, subtracted."""

    def __getattr__(self, name: str) -> Callable[..., None]:
        return _nothing


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.log_events", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--events", type=int, default=20000, help="calls per event kind")
    parser.add_argument("--mails", type=int, default=300, help="mails the worker delivers")
    parser.add_argument("--no-worker", action="store_true", help="per-event costs only")
    args = parser.parse_args(argv)
    per_event(args.events)
    if not args.no_worker:
        per_mail(args.mails)


if __name__ == "__main__":
    main()
