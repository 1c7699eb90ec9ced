"""Peer of issue 15: Celery with the Redis broker, a task that sends over one smtplib connection kept per
worker process (module global: :func:`bench.baselines.smtplib_kept_connection`, the same job body as
baseline (b)).

``python -m bench.peers.celery_peer work --concurrency C --messages N`` runs ``celery worker`` on the bench's
private Redis (``REDIS_URL``): ``--pool solo`` for C = 1 (one process, like ``SimpleWorker``),
``--pool prefork --concurrency C`` above (C forked children, each with its own kept connection).
Celery has no burst mode: a thread in the main process, started on ``worker_ready``, watches the
worker's own counters (tasks accepted minus tasks still active) and sends the process SIGTERM (warm
shutdown) once N tasks are done; N = 0 stops it right after start-up (the harness's start-up CPU).

Settings a Redis user would pick for such a worker: ``--without-gossip --without-mingle
--without-heartbeat`` (mingle alone waits ~1 s at start-up for other workers), JSON, results ignored,
log level WARNING (Celery's default). Prefetch stays at the default (4 per process); acks early (default).

``python -m bench.peers.celery_peer enqueue`` reads a JSON list of ``[host, port, mail]`` on stdin and
sends one task per item (``apply_async`` over one producer connection): the drain's untimed fill.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready

from bench import baselines

QUEUE = "bench-celery"
POLL_S = 0.005

app = Celery("bench_peer", broker=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench_peer.send")
def send(host: str, port: int, mail: dict[str, Any]) -> str:
    return baselines.smtplib_kept_connection(host, port, mail)


def enqueue(jobs: list[list[Any]]) -> None:
    """Producer side (untimed in the drain): one ``apply_async`` per mail over one broker connection."""
    with app.producer_or_acquire() as producer:
        for args in jobs:
            send.apply_async(args=args, producer=producer)


_target = 0


def _watch() -> None:
    from celery.worker import state

    while state.all_total_count[0] - len(state.active_requests) < _target:
        time.sleep(POLL_S)
    os.kill(os.getpid(), signal.SIGTERM)


@worker_ready.connect
def _start_watch(**_: Any) -> None:
    threading.Thread(target=_watch, name="bench-burst", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    global _target
    parser = argparse.ArgumentParser(prog="python -m bench.peers.celery_peer")
    parser.add_argument("mode", choices=["work", "enqueue"])
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--messages", type=int, default=0)
    args = parser.parse_args(argv)
    if args.mode == "enqueue":
        enqueue(json.load(sys.stdin))
        return
    _target = args.messages
    pool = ["--pool", "solo"] if args.concurrency == 1 else ["--pool", "prefork",
                                                             "--concurrency", str(args.concurrency)]
    app.worker_main(["worker", *pool, "-Q", QUEUE, "-n", f"bench{os.getpid()}@localhost",
                     "--without-gossip", "--without-mingle", "--without-heartbeat", "--loglevel", "WARNING"])


if __name__ == "__main__":
    main()
