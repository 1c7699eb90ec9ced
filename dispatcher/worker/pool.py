"""``worker.py --concurrency N [--connections K]``: N worker processes (``process.run_one``) under one
supervisor, each using up to K connections to a route at once (``delivery.lanes``).

SIGTERM/SIGINT is passed on once (each child finishes its current send, QUITs and exits 0); a second
signal is passed on too and aborts them.

The invariant kept here: **while the pool is not stopping, every slot has a child or a restart due.** A
child that exits for any reason — a crash, a signal (SIGKILL included), or exit 0 without being asked
to stop — is started again after ``RestartBackoff``'s delay: exponential from ``BASE``, capped at ``CAP``,
jittered, and back to ``BASE`` once a child had run ``HEALTHY`` seconds, so a child that cannot start
(a Redis refusing its commands; a Redis merely away is waited for, see ``startup``) is restarted at most
once every ``CAP`` seconds once its delay has grown, not hundreds of times in 15 s (issue 13). In
``--burst`` a child that exits 0 is done, and none is restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from collections.abc import Callable, Sequence
from types import FrameType

import structlog

from dispatcher.errors import ConfigurationError
from dispatcher.logs import configure_logging
from dispatcher.queue.producer import QUEUE_NAMES
from dispatcher.settings import load_settings
from dispatcher.values import parse_redis_url
from dispatcher.worker.backoff import RestartBackoff
from dispatcher.worker.lineage import die_with_parent, note_early_stop
from dispatcher.worker.process import STOP_SIGNALS, run_one

logger = structlog.get_logger("dispatcher.worker.pool")
#: worker.py's exit codes (README, "Exit codes"): 0 stopped cleanly; 1 a worker process failed; 2 bad
#: configuration (a setting or option named in the one log line).
EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class Child:
    """A forked worker process (forked, not spawned: the imports are done once, in the supervisor)."""

    def __init__(
        self, queue_names: Sequence[str], burst: bool, redis_url: str | None = None, connections: int = 1
    ) -> None:
        self.returncode: int | None = None
        # Signals wait until the child has its own handler: the supervisor's must never run in a child.
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the supervisor
            for signum in STOP_SIGNALS:
                signal.signal(signum, note_early_stop)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            code = 1
            try:
                os.setsid()  # own session: a terminal's Ctrl-C reaches only the supervisor (it passes it on)
                die_with_parent()  # a supervisor killed with kill -9 takes its workers with it (warm stop)
                code = run_one(queue_names, burst=burst, redis_url=redis_url, connections=connections)
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

    def __init__(
        self,
        concurrency: int,
        queue_names: Sequence[str],
        *,
        burst: bool,
        redis_url: str | None = None,
        connections: int = 1,
    ) -> None:
        self.concurrency = concurrency
        self.connections = connections
        self.redis_url = redis_url
        self.queue_names = list(queue_names)
        self.burst = burst
        self.children: list[Child] = []
        self.stopping = 0

    def _spawn(self) -> Child:
        return Child(self.queue_names, self.burst, self.redis_url, self.connections)

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
        started = [time.monotonic()] * self.concurrency
        backoffs = [RestartBackoff() for _ in range(self.concurrency)]
        due: dict[int, float] = {}  # slot → when its dead child is started again
        logger.info(
            "pool_started",
            processes=self.concurrency,
            connections=self.connections,
            pids=[c.pid for c in self.children],
        )
        while True:
            running = 0
            for index, child in enumerate(self.children):
                if index in due:  # its child is dead: start another when the delay is over
                    if self.stopping:
                        del due[index]
                        continue
                    running += 1
                    if time.monotonic() >= due[index]:
                        del due[index]
                        self.children[index] = self._spawn()
                        started[index] = time.monotonic()
                        logger.info(
                            "worker_process_restarted",
                            slot=index,
                            pid=self.children[index].pid,
                            previous_pid=child.pid,
                        )
                    continue
                code = child.poll()
                if code is None:
                    running += 1
                elif not self.stopping and not self.burst:  # any exit, 0 included
                    ran_for = time.monotonic() - started[index]
                    delay = backoffs[index].delay(ran_for)
                    due[index] = time.monotonic() + delay
                    logger.warning(
                        "worker_process_died",
                        slot=index,
                        pid=child.pid,
                        exit_code=code,
                        ran_for=round(ran_for, 3),
                        restart_in=round(delay, 3),
                    )
                    running += 1
            if not running:
                break
            nearest = min(due.values(), default=time.monotonic() + 0.2) - time.monotonic()
            time.sleep(min(0.2, max(0.01, nearest)))
        codes = [child.returncode for child in self.children]
        logger.info("pool_stopped", exit_codes=codes)
        # A child still starting when we passed SIGTERM on dies of it before rq installs its handler.
        clean = (0, -signal.SIGTERM) if self.stopping else (0,)
        return EXIT_OK if all(code in clean for code in codes) else EXIT_FAILED


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
    parser.add_argument(
        "--connections",
        "-k",
        type=_count("DISPATCH_CONNECTIONS"),
        default=os.environ.get("DISPATCH_CONNECTIONS", "1"),
        help="SMTP connections to a route one process uses at once (default 1, env DISPATCH_CONNECTIONS)",
    )
    parser.add_argument("--burst", action="store_true", help="stop when the queues are empty")
    parser.add_argument("--redis-url", default=None, help="default: $REDIS_URL or redis://127.0.0.1:6379/0")
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
    if args.connections < 1:
        parser.error(f"--connections must be at least 1, not {args.connections}")
    return args


def _count(variable: str) -> Callable[[str], int]:
    """An argparse type for a whole number that may come from ``variable`` (named in its error)."""

    def parse(raw: str) -> int:
        try:
            return int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {raw!r} (or ${variable})") from None

    return parse


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging()
    try:
        load_settings(need_routes=True)
        redis_url = parse_redis_url("--redis-url", args.redis_url) if args.redis_url else None
    except ConfigurationError as exc:
        logger.error("worker_config_invalid", error=str(exc))
        return EXIT_CONFIG
    if args.concurrency == 1:
        return run_one(args.queues, burst=args.burst, redis_url=redis_url, connections=args.connections)
    supervisor = Supervisor(
        args.concurrency, args.queues, burst=args.burst, redis_url=redis_url, connections=args.connections
    )
    return supervisor.run()
