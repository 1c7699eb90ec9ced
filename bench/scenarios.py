"""What the harness runs: a :class:`Scenario` is a way to enqueue N mails plus a way to start workers.

The harness owns everything else (private Redis, sink, delay proxy, timing, rusage), so adding a
contender means writing two functions:

- ``worker_cmds(env, workers) -> list[list[str]]`` — the processes to start for ``workers`` units of
  concurrency. One command per process (the baselines: N separate ``rq worker`` processes), or one
  command that forks its own pool (the dispatcher: ``worker.py --concurrency N``). Every process gets
  ``env.process_env()`` (REDIS_URL, SMTP_URL, PYTHONPATH) and must exit by itself when the queue is
  empty (burst mode); the harness waits for all of them.
- ``enqueue(n, env)`` — put n mails on the queue before the workers start (not timed).

``enqueue_cases`` feed scenario 4 (producer speed); they are timed by the harness.

``peer=True`` puts a scenario in scenario 5 (issue 15's RTT x C grid: ours, ours with C connections in
one process, baseline (b), and the peers of :mod:`bench.peers.contenders`); ``kinds`` names its worker
processes by depth for the CPU-per-process-kind column.

``sink`` picks the SMTP sink: ``"aiosmtpd"`` (PIPELINING) or ``"chunking"`` (PIPELINING + CHUNKING,
:mod:`bench.chunking_sink`). :func:`on_chunking_sink` makes the CHUNKING copy of a scenario.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from redis import Redis
from rq import Queue
from rq.serializers import JSONSerializer

from bench import baselines

PROJECT_ROOT = Path(__file__).resolve().parent.parent
BENCH_QUEUE = "bench"


@dataclass(frozen=True)
class BenchEnv:
    """Where one run points: private Redis, SMTP endpoint (the delay proxy), and the run's size."""

    redis_url: str
    smtp_host: str
    smtp_port: int
    run_id: str
    messages: int = 0
    project_root: Path = PROJECT_ROOT

    @property
    def smtp_url(self) -> str:
        return f"smtp://{self.smtp_host}:{self.smtp_port}"

    def process_env(self) -> dict[str, str]:
        """Extra environment variables for every worker process."""
        return {"REDIS_URL": self.redis_url, "SMTP_URL": self.smtp_url, "PYTHONPATH": str(self.project_root)}

    def sized(self, messages: int) -> BenchEnv:
        return replace(self, messages=messages)


WorkerCmds = Callable[[BenchEnv, int], list[list[str]]]
Enqueue = Callable[[int, BenchEnv], None]
#: names of the worker processes by depth under each started command, for ``workers`` units of
#: concurrency: ``kinds(16) == ("supervisor", "worker", "rq scheduler")`` (deeper ones take the last name)
Kinds = Callable[[int], tuple[str, ...]]


def fixed_kinds(*names: str) -> Kinds:
    return lambda workers: names


ANY_KINDS = fixed_kinds("process", "child")


@dataclass(frozen=True)
class EnqueueCase:
    """A row of scenario 4: ``fn(n, env)`` enqueues n jobs; ``fn=None`` prints a placeholder row."""

    name: str
    fn: Enqueue | None
    note: str = ""
    max_n: int | None = None  # cap for slow one-by-one cases (keeps --short short); rate is per job


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    worker_cmds: WorkerCmds
    enqueue: Enqueue
    queues: tuple[str, ...] = (BENCH_QUEUE,)
    throughput: bool = True  # scenario 1 (one unit of concurrency, 0 and 20 ms RTT)
    scaling: bool = False  # scenario 2 (1..16 units at 20 ms RTT)
    enqueue_cases: tuple[EnqueueCase, ...] = field(default=())
    sink: str = "aiosmtpd"  # which sink of the Lab: "aiosmtpd" or "chunking"
    peer: bool = False  # scenario 5 (issue 15's grid: RTT x C against BullMQ + Nodemailer and Celery)
    kinds: Kinds = ANY_KINDS  # names of the worker processes by depth (CPU per kind in scenario 5)
    skip_c1: bool = False  # scenario 5: not run at C = 1 (the same command as another contender there)
    skip_upto: int = 0  # scenario 5: not run at C <= this (the same command as another contender there)


CHUNKING_SUFFIX = " (CHUNKING sink)"


def on_chunking_sink(scenario: Scenario, *, scaling: bool = False) -> Scenario:
    """The same workers against the CHUNKING sink (our client then sends MAIL+RCPT+BDAT LAST+data at once)."""
    return replace(scenario, name=scenario.name + CHUNKING_SUFFIX, sink="chunking", scaling=scaling,
                   description=scenario.description + "; sink offers CHUNKING", enqueue_cases=(), peer=False)


def base_name(name: str) -> str:
    """Scenario name without the sink suffix."""
    return name.removesuffix(CHUNKING_SUFFIX)


# --- baselines ------------------------------------------------------------------------------------


def _rq_worker_cmds(worker_class: str) -> WorkerCmds:
    def cmds(env: BenchEnv, workers: int) -> list[list[str]]:
        one = [
            sys.executable, "-m", "rq.cli", "worker", "--burst", "--url", env.redis_url,
            "--serializer", "rq.serializers.JSONSerializer", "--worker-class", worker_class, BENCH_QUEUE,
        ]
        return [list(one) for _ in range(workers)]

    return cmds


def job_data(env: BenchEnv, seq: int) -> tuple[Any, ...]:
    return (env.smtp_host, env.smtp_port, baselines.make_mail(seq, env.run_id))


def _rq_queue(env: BenchEnv) -> Queue:
    return Queue(BENCH_QUEUE, connection=Redis.from_url(env.redis_url), serializer=JSONSerializer)


def _rq_enqueue_many(func: Callable[..., Any]) -> Enqueue:
    def enqueue(n: int, env: BenchEnv) -> None:
        queue = _rq_queue(env)
        datas = [Queue.prepare_data(func, args=job_data(env, i)) for i in range(n)]
        queue.enqueue_many(datas)

    return enqueue


def _rq_enqueue_one_by_one(func: Callable[..., Any]) -> Enqueue:
    def enqueue(n: int, env: BenchEnv) -> None:
        queue = _rq_queue(env)
        for i in range(n):
            queue.enqueue(func, *job_data(env, i))

    return enqueue


def _raw_cmds(env: BenchEnv, workers: int) -> list[list[str]]:
    return [[sys.executable, "-m", "bench.raw_send", "--host", env.smtp_host, "--port", str(env.smtp_port),
             "--count", str(env.messages), "--run-id", env.run_id]]


def _raw_bdat_cmds(env: BenchEnv, workers: int) -> list[list[str]]:
    return [[sys.executable, "-m", "bench.raw_bdat", "--host", env.smtp_host, "--port", str(env.smtp_port),
             "--count", str(env.messages), "--run-id", env.run_id]]


def _nothing(n: int, env: BenchEnv) -> None:
    return None


RQ_ENQUEUE_MANY_NOOP = "rq Queue.enqueue_many (no-op jobs)"


def _rq_enqueue_many_noop(n: int, env: BenchEnv) -> None:
    """Issue 15's floor for bulk enqueue: rq's own enqueue_many of jobs that carry nothing."""
    queue = _rq_queue(env)
    queue.enqueue_many([Queue.prepare_data(baselines.noop) for _ in range(n)])


BASELINE_NEW = Scenario(
    name="rq-Worker+smtplib-new",
    description="(a) rq forking Worker, new smtplib connection per job",
    worker_cmds=_rq_worker_cmds("rq.worker.Worker"),
    enqueue=_rq_enqueue_many(baselines.smtplib_new_connection),
    kinds=fixed_kinds("rq worker", "rq work-horse"),
    enqueue_cases=(
        EnqueueCase(
            "rq Queue.enqueue (one by one)", _rq_enqueue_one_by_one(baselines.smtplib_new_connection)
        ),
        EnqueueCase("rq Queue.enqueue_many", _rq_enqueue_many(baselines.smtplib_new_connection)),
        EnqueueCase(RQ_ENQUEUE_MANY_NOOP, _rq_enqueue_many_noop, "no-op jobs without arguments"),
    ),
)

BASELINE_KEPT = Scenario(
    name="rq-SimpleWorker+smtplib-kept",
    description="(b) rq SimpleWorker, one smtplib connection kept across jobs; C = separate processes",
    worker_cmds=_rq_worker_cmds("rq.worker.SimpleWorker"),
    enqueue=_rq_enqueue_many(baselines.smtplib_kept_connection),
    scaling=True,
    peer=True,
    kinds=fixed_kinds("rq worker", "rq work-horse"),
)

RAW_SMTPLIB = Scenario(
    name="smtplib-raw",
    description="ceiling: one process, one smtplib connection, no queue",
    worker_cmds=_raw_cmds,
    enqueue=_nothing,
    queues=(),
)

RAW_BDAT = Scenario(
    name="raw-BDAT (CHUNKING sink)",
    description="ceiling at 1 round trip per message: raw socket, MAIL+RCPT+BDAT LAST+data, no queue",
    worker_cmds=_raw_bdat_cmds,
    enqueue=_nothing,
    queues=(),
    sink="chunking",
)


# --- ours -------------------------------------------------------------------------------------------

DISPATCHER_QUEUES = ("mail-high", "mail-default", "mail-bulk")
OURS = "dispatcher"
OURS_CONNS = "dispatcher (1 process x C connections)"
OURS_SPREAD = "dispatcher (P processes x C/P connections)"
#: P for ``OURS_SPREAD``: one worker process per core (what the README recommends).
CORES = os.cpu_count() or 1
CONNECTIONS_FLAG = "--connections"


def _dispatcher_kinds(workers: int) -> tuple[str, ...]:
    """worker.py -c 1 is the worker itself (rq's scheduler its child); -c N a supervisor above N workers."""
    return ("worker", "rq scheduler") if workers == 1 else ("supervisor", "worker", "rq scheduler")


def dispatcher_mail(seq: int, env: BenchEnv) -> dict[str, Any]:
    """The mail dict handed to ``dispatcher.enqueue_many``. Adjust if the producer API's shape differs."""
    return baselines.make_mail(seq, env.run_id)


def dispatcher_scenario() -> Scenario | None:
    """Ours, enabled as soon as ``dispatcher.enqueue_many`` and ``worker.py`` exist; None until then."""
    worker = PROJECT_ROOT / "worker.py"
    try:
        from dispatcher import enqueue_many
    except ImportError:
        return None
    if not worker.exists():
        return None

    def enqueue(n: int, env: BenchEnv) -> None:
        enqueue_many([dispatcher_mail(i, env) for i in range(n)], connection=Redis.from_url(env.redis_url))

    def enqueue_producer(n: int, env: BenchEnv) -> None:
        from dispatcher import Producer

        Producer(Redis.from_url(env.redis_url)).enqueue_many(dispatcher_mail(i, env) for i in range(n))

    def enqueue_one_by_one(n: int, env: BenchEnv) -> None:
        from dispatcher import enqueue as enqueue_one

        redis = Redis.from_url(env.redis_url)
        for i in range(n):
            enqueue_one(dispatcher_mail(i, env), connection=redis)

    def cmds(env: BenchEnv, workers: int) -> list[list[str]]:
        return [[sys.executable, str(worker), "--burst", "--concurrency", str(workers)]]

    return Scenario(
        name=OURS,
        description="ours: worker.py --concurrency N, one SmtpSession per process",
        worker_cmds=cmds,
        enqueue=enqueue,
        queues=DISPATCHER_QUEUES,
        scaling=True,
        peer=True,
        kinds=_dispatcher_kinds,
        enqueue_cases=(
            EnqueueCase("dispatcher.enqueue (one by one)", enqueue_one_by_one, max_n=1000),
            EnqueueCase("dispatcher.enqueue_many", enqueue),
            EnqueueCase("dispatcher.Producer.enqueue_many", enqueue_producer, "per-item results"),
        ),
    )


def dispatcher_conns_scenario(ours: Scenario) -> Scenario | str:
    """``worker.py --concurrency 1 --connections C``: C SMTP connections in one process, or why not."""
    worker = PROJECT_ROOT / "worker.py"
    try:
        usage = subprocess.run([sys.executable, str(worker), "--help"], capture_output=True, text=True,
                               timeout=60, check=False, cwd=PROJECT_ROOT).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"SKIPPED: {OURS_CONNS}: worker.py --help failed ({exc})"
    if CONNECTIONS_FLAG not in usage:
        return f"SKIPPED: worker.py has no {CONNECTIONS_FLAG} (row {OURS_CONNS!r} not run)"

    def cmds(env: BenchEnv, workers: int) -> list[list[str]]:
        return [[sys.executable, str(worker), "--burst", "--concurrency", "1",
                 CONNECTIONS_FLAG, str(workers)]]

    return replace(ours, name=OURS_CONNS, worker_cmds=cmds, throughput=False, scaling=False,
                   enqueue_cases=(), kinds=fixed_kinds("worker", "rq scheduler"), skip_c1=True,
                   description=f"ours: worker.py --concurrency 1 {CONNECTIONS_FLAG} C, one process")


def dispatcher_spread_scenario(conns: Scenario) -> Scenario:
    """``worker.py --concurrency P --connections C/P`` with P = the machine's cores: C connections over one
    process per core (run only where C > P; at C <= P it is the C-processes row)."""
    worker = PROJECT_ROOT / "worker.py"

    def cmds(env: BenchEnv, workers: int) -> list[list[str]]:
        processes = min(CORES, workers)
        return [[sys.executable, str(worker), "--burst", "--concurrency", str(processes),
                 CONNECTIONS_FLAG, str(max(1, workers // processes))]]

    return replace(conns, name=OURS_SPREAD, worker_cmds=cmds, skip_upto=CORES, kinds=_dispatcher_kinds,
                   description=f"ours: worker.py --concurrency {CORES} {CONNECTIONS_FLAG} C/{CORES}")


DISPATCHER_PLACEHOLDER = EnqueueCase("dispatcher.enqueue_many", None, "not available yet")


RATE_NOT_REACHED = 100_000


def with_unreached_rate_limit(scenario: Scenario) -> Scenario:
    """Ours with a route rate limit far above what one worker can do: what the throttle itself costs."""
    inner = scenario.worker_cmds

    def cmds(env: BenchEnv, workers: int) -> list[list[str]]:
        route = f"SMTP_URL={env.smtp_url}?rate={RATE_NOT_REACHED}"
        return [["env", route, *command] for command in inner(env, workers)]

    return replace(scenario, name=scenario.name + " (rate limit not reached)", worker_cmds=cmds,
                   description=scenario.description + f"; route rate={RATE_NOT_REACHED}/s",
                   scaling=False, enqueue_cases=(), peer=False)  # fmt: skip


def all_scenarios() -> list[Scenario]:
    ours = dispatcher_scenario()
    if ours is None:
        return [BASELINE_NEW, BASELINE_KEPT, RAW_SMTPLIB, on_chunking_sink(BASELINE_KEPT), RAW_BDAT]
    with_ours = [ours, with_unreached_rate_limit(ours), on_chunking_sink(ours, scaling=True)]
    return [BASELINE_NEW, BASELINE_KEPT, RAW_SMTPLIB, on_chunking_sink(BASELINE_KEPT), RAW_BDAT, *with_ours]
