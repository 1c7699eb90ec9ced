"""Worker processes: each a non-forking rq worker keeping its SMTP connections across jobs.

rq's default ``Worker`` forks a work-horse per job, so a connection opened in a job dies with it;
``SimpleWorker`` runs jobs in-process, which is what lets one ``SmtpClient`` per route serve every job.
``MailWorker`` adds: the per-process runtime, a job timeout derived from the routes' stage deadlines,
crash recovery in the maintenance loop, and QUIT at teardown (burst end, warm or cold shutdown).

Several of them, supervised, are ``dispatcher.worker.pool``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

import redis
import structlog
from rq import Queue, SimpleWorker
from rq.exceptions import StopRequested
from rq.job import Job
from rq.serializers import JSONSerializer

from dispatcher.queue.producer import BATCH_FUNCTION, connect
from dispatcher.queue.recovery import reap_abandoned
from dispatcher.queue.store import worker_key
from dispatcher.settings import load_settings
from dispatcher.worker.runtime import Runtime

logger = structlog.get_logger("dispatcher.worker.process")
MAINTENANCE_INTERVAL = 10
WORKER_TTL = 35
#: rq's own worker key lives worker_ttl + 60 s; an idle worker refreshes its status only between dequeues.
STATUS_TTL = WORKER_TTL + 60


class MailWorker(SimpleWorker):
    """A ``SimpleWorker`` owning the process's ``Runtime`` (settings and kept SMTP clients)."""

    def __init__(self, queues: Sequence[Queue], *, runtime: Runtime, **kwargs: Any) -> None:
        kwargs.setdefault("serializer", JSONSerializer)
        kwargs.setdefault("maintenance_interval", MAINTENANCE_INTERVAL)
        kwargs.setdefault("worker_ttl", WORKER_TTL)
        super().__init__(queues, **kwargs)
        self.runtime = Runtime.install(runtime)
        self.runtime.worker_name = self.name
        self.runtime.should_stop = lambda: bool(self._stop_requested)
        self._limits: dict[str, dict[str, object]] = {}

    def _install_signal_handlers(self) -> None:
        super()._install_signal_handlers()  # type: ignore[no-untyped-call]
        if _stop_before_start:  # a stop asked for while we were starting: honour it now that rq listens
            self._stop_requested = True  # the work loop checks this before it dequeues
            for signum in STOP_SIGNALS:  # and a second signal is a cold stop, as in rq's request_stop
                signal.signal(signum, self.request_force_stop)

    def perform_job(self, job: Job, queue: Queue) -> bool:
        sends = len(job.args[0]) if job.func_name == BATCH_FUNCTION and job.args else 1
        job.timeout = int(self.runtime.settings.job_timeout() * sends)
        try:
            return bool(super().perform_job(job, queue))
        finally:
            self.publish_status()

    def publish_status(self, *, limits: bool = False) -> None:
        """Routes and connection states for the dashboard; expires if the worker stops refreshing it.
        ``limits`` (every maintenance round, not after every job) also reads the routes' limit states."""
        routes = self.runtime.describe()
        if limits:
            gate = self.runtime.gate(self.connection)
            self._limits = {name: gate.describe(name) for name in routes}
        for name, route in routes.items():
            route["limits"] = self._limits.get(name, {})
        status = {"routes": routes, "updated_at": time.time()}
        try:
            self.connection.set(worker_key(self.name), json.dumps(status), ex=STATUS_TTL)
        except redis.RedisError as exc:
            logger.warning("worker_status_failed", error=str(exc))

    def run_maintenance_tasks(self) -> None:
        try:
            self.publish_status(limits=True)
        except redis.RedisError as exc:
            logger.warning("worker_status_failed", error=str(exc))
        super().run_maintenance_tasks()  # type: ignore[no-untyped-call]
        try:
            reap_abandoned(self.connection)
        except StopRequested:  # rq's warm stop, raised from its signal handler while idle: let it through
            raise
        except Exception as exc:  # recovery must never take the worker down with it
            logger.exception("recovery_failed", error=str(exc))

    def teardown(self) -> None:
        self.runtime.close()
        with contextlib.suppress(redis.RedisError):
            self.connection.delete(worker_key(self.name))
        super().teardown()  # type: ignore[no-untyped-call]


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_stop_before_start: list[int] = []


def note_early_stop(signum: int, frame: FrameType | None) -> None:
    _stop_before_start.append(signum)


def run_one(queue_names: Sequence[str], *, burst: bool) -> int:
    """Run one worker in this process until it stops; 0 on a clean stop."""
    for signum in STOP_SIGNALS:  # until rq installs its own handlers in work()
        signal.signal(signum, note_early_stop)
    settings = load_settings(need_routes=True)
    connection = connect(settings.redis_url)
    queues = [Queue(name, connection=connection, serializer=JSONSerializer) for name in queue_names]
    worker = MailWorker(queues, connection=connection, runtime=Runtime(settings))
    logger.info(
        "worker_started",
        worker=worker.name,
        queues=list(queue_names),
        burst=burst,
        routes={name: cfg.redacted_url() for name, cfg in settings.routes.items()},
    )
    if _stop_before_start:
        logger.info("worker_stopped_before_start", worker=worker.name)
        return 0
    worker.work(
        burst=burst,
        with_scheduler=True,
        logging_level=logging.getLevelName(logging.getLogger("rq").getEffectiveLevel()),
    )
    logger.info("worker_stopped", worker=worker.name)
    return 0
