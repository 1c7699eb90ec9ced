"""Worker processes: each a non-forking rq worker keeping its SMTP connections across jobs.

rq's default ``Worker`` forks a work-horse per job, so a connection opened in a job dies with it;
``SimpleWorker`` runs jobs in-process, which is what lets one ``SmtpClient`` per route serve every job.
``MailWorker`` adds: the per-process runtime, a job timeout derived from the routes' stage deadlines,
crash recovery in the maintenance loop, and QUIT at teardown (burst end, warm or cold shutdown).

``worker.py --concurrency N`` starts N such processes and supervises them: SIGTERM/SIGINT is passed on
once (each child finishes its current send, QUITs and exits 0); a second signal is passed on too and
aborts them; a child that dies is started again unless we are stopping.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
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

from dispatcher.errors import ConfigurationError
from dispatcher.logs import configure_logging
from dispatcher.producer import BATCH_FUNCTION, QUEUE_NAMES, connect
from dispatcher.recovery import reap_abandoned
from dispatcher.runtime import Runtime
from dispatcher.settings import load_settings
from dispatcher.store import worker_key

logger = structlog.get_logger("dispatcher.worker")
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


def _note_early_stop(signum: int, frame: FrameType | None) -> None:
    _stop_before_start.append(signum)


def run_one(queue_names: Sequence[str], *, burst: bool) -> int:
    """Run one worker in this process until it stops; 0 on a clean stop."""
    for signum in STOP_SIGNALS:  # until rq installs its own handlers in work()
        signal.signal(signum, _note_early_stop)
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


class Child:
    """A forked worker process (forked, not spawned: the imports are done once, in the supervisor)."""

    def __init__(self, queue_names: Sequence[str], burst: bool) -> None:
        self.returncode: int | None = None
        # Signals wait until the child has its own handler: the supervisor's must never run in a child.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor
            for signum in STOP_SIGNALS:
                signal.signal(signum, _note_early_stop)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            code = 1
            try:
                os.setsid()  # own session: a terminal's Ctrl-C reaches only the supervisor (it passes it on)
                code = run_one(queue_names, burst=burst)
            except BaseException:
                logger.exception("worker_process_crashed")
            finally:
                os._exit(code)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        self.pid = pid

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signum)


class Supervisor:
    """Starts N worker processes, forwards stop signals, restarts the ones that die."""

    def __init__(self, concurrency: int, queue_names: Sequence[str], *, burst: bool) -> None:
        self.concurrency = concurrency
        self.queue_names = list(queue_names)
        self.burst = burst
        self.children: list[Child] = []
        self.stopping = 0

    def _spawn(self) -> Child:
        return Child(self.queue_names, self.burst)

    def _signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping += 1
        logger.info("pool_stopping", signal=signal.Signals(signum).name, cold=self.stopping > 1)
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        self.children = [self._spawn() for _ in range(self.concurrency)]
        logger.info("pool_started", processes=self.concurrency, pids=[c.pid for c in self.children])
        while True:
            running = 0
            for index, child in enumerate(self.children):
                code = child.poll()
                if code is None:
                    running += 1
                elif code != 0 and not self.stopping and not self.burst:
                    logger.warning("worker_process_died", pid=child.pid, exit_code=code)
                    self.children[index] = self._spawn()
                    running += 1
            if not running:
                break
            time.sleep(0.2)
        codes = [child.returncode for child in self.children]
        logger.info("pool_stopped", exit_codes=codes)
        # A child still starting when we passed SIGTERM on dies of it before rq installs its handler.
        clean = (0, -signal.SIGTERM) if self.stopping else (0,)
        return 0 if all(code in clean for code in codes) else 1


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="worker.py", description="Deliver queued mail over kept SMTP connections."
    )
    parser.add_argument(
        "--concurrency",
        "-c",
        type=int,
        default=int(os.environ.get("DISPATCH_CONCURRENCY", "1")),
        help="worker processes on this host (default 1, env DISPATCH_CONCURRENCY)",
    )
    parser.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    parser.add_argument(
        "--queues",
        nargs="+",
        default=list(QUEUE_NAMES),
        metavar="QUEUE",
        help="queues in priority order (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.concurrency < 1:
        parser.error("--concurrency must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        load_settings(need_routes=True)
    except ConfigurationError as exc:
        logger.error("worker_config_invalid", error=str(exc))
        return 2
    if args.concurrency == 1:
        return run_one(args.queues, burst=args.burst)
    return Supervisor(args.concurrency, args.queues, burst=args.burst).run()


if __name__ == "__main__":
    sys.exit(main())
