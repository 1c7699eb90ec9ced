"""Measurement core: fill the queue, start burst workers, time the drain, read CPU and RSS.

One :class:`Lab` holds the private Redis and the sink subprocess for a whole bench run; each drain gets
its own delay proxy (in this process: its CPU is charged neither to workers nor to the sink).

Timing: ``t0`` is taken just before the worker processes are spawned; the sink stamps the first and last
accepted message with the system-wide monotonic clock. ``msgs_per_s`` = delivered / (last - t0), i.e.
including interpreter start-up as a real burst would; ``steady_msgs_per_s`` = (delivered - 1) /
(last - first), the rate once mail flows.

CPU and memory come from ``os.wait4`` on each worker process: user+sys of the process and of every
child it waited for (rq's forked work-horses, a pool's children), and its peak RSS. Start-up cost is
measured by running the same commands against an empty queue; ``cpu_ms_per_msg_net`` subtracts it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from bench.delay_proxy import DelayProxy
from bench.redis_server import PrivateRedis
from bench.scenarios import BenchEnv, EnqueueCase, Scenario
from bench.sink import SinkProcess

POLL_S = 0.005


@dataclass
class ProcUsage:
    cpu_s: float = 0.0
    peak_rss_kb: int = 0
    exit_codes: tuple[int, ...] = ()
    timed_out: bool = False


@dataclass
class DrainResult:
    scenario: str
    rtt_ms: float
    workers: int
    processes: int
    messages: int
    delivered: int
    connections: int
    ehlo: int
    quit: int
    failed_jobs: int
    left_in_queue: int
    wall_s: float | None
    msgs_per_s: float | None
    steady_msgs_per_s: float | None
    workers_exit_s: float
    cpu_ms_total: float
    cpu_ms_per_msg: float | None
    startup_cpu_ms: float
    cpu_ms_per_msg_net: float | None
    peak_rss_mb: float
    ok: bool
    error: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EnqueueResult:
    case: str
    n: int
    seconds: float | None
    jobs_per_s: float | None
    available: bool
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Lab:
    """Private Redis + sink subprocess + a log file, shared by every run of one bench invocation."""

    def __init__(self, timeout_s: float = 120.0) -> None:
        self.timeout_s = timeout_s
        self.redis = PrivateRedis()
        self._tmp = tempfile.TemporaryDirectory(prefix="bench-")
        self.log_path = Path(self._tmp.name) / "workers.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.sink = SinkProcess(log=self._log)
        self._startup_cache: dict[tuple[str, int], float] = {}

    def start(self) -> Lab:
        self.redis.start()
        self.sink.start()
        return self

    def stop(self) -> None:
        self.sink.stop()
        self.redis.stop()
        self._log.close()
        self._tmp.cleanup()

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def env(self, smtp_port: int, messages: int = 0) -> BenchEnv:
        return BenchEnv(self.redis.url, "127.0.0.1", smtp_port, uuid.uuid4().hex[:8], messages)

    def clean(self) -> None:
        """Empty our private Redis (never a server we did not start) and zero the sink's counters."""
        self.redis.client().flushdb()
        self.sink.reset()

    def log_tail(self, lines: int = 15) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def run_processes(self, cmds: list[list[str]], env: BenchEnv) -> ProcUsage:
        """Spawn every command, wait for all (bounded by timeout_s), sum their rusage."""
        proc_env = {**os.environ, **env.process_env()}
        procs = [
            subprocess.Popen(cmd, env=proc_env, cwd=env.project_root, stdout=self._log, stderr=self._log,
                             stdin=subprocess.DEVNULL, start_new_session=True)
            for cmd in cmds
        ]
        usage = ProcUsage()
        codes: list[int] = []
        pending = {p.pid: p for p in procs}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            for pid in list(pending):
                done_pid, status, rusage = os.wait4(pid, os.WNOHANG)
                if done_pid == 0:
                    continue
                proc = pending.pop(pid)
                proc.returncode = os.waitstatus_to_exitcode(status)
                codes.append(proc.returncode)
                usage.cpu_s += rusage.ru_utime + rusage.ru_stime
                usage.peak_rss_kb = max(usage.peak_rss_kb, rusage.ru_maxrss)
            if pending and time.monotonic() > deadline:
                usage.timed_out = True
                for pid in pending:  # each worker runs in its own session: kill exactly that group
                    os.killpg(pid, signal.SIGKILL)
                for pid, proc in pending.items():
                    _, status, _ = os.wait4(pid, 0)
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    codes.append(proc.returncode)
                pending.clear()
            elif pending:
                time.sleep(POLL_S)
        usage.exit_codes = tuple(codes)
        return usage

    def startup_cpu_s(self, scenario: Scenario, workers: int) -> float:
        """CPU the worker processes burn with nothing to do (imports, registration, exit)."""
        key = (scenario.name, workers)
        if key not in self._startup_cache:
            self.clean()
            env = self.env(smtp_port=self.sink.port, messages=0)
            self._startup_cache[key] = self.run_processes(scenario.worker_cmds(env, workers), env).cpu_s
        return self._startup_cache[key]

    def drain(self, scenario: Scenario, rtt_ms: float, workers: int, messages: int) -> DrainResult:
        startup = self.startup_cpu_s(scenario, workers)
        self.clean()
        with DelayProxy("127.0.0.1", self.sink.port, rtt_ms / 2000.0) as proxy:
            env = self.env(smtp_port=proxy.port, messages=messages)
            scenario.enqueue(messages, env)
            cmds = scenario.worker_cmds(env, workers)
            t0 = time.monotonic()
            usage = self.run_processes(cmds, env)
            t_exit = time.monotonic()
        stats = self.sink.stats()
        failed, left = self._queue_state(scenario)
        delivered = stats.messages
        wall = stats.last_ts - t0 if stats.last_ts is not None else None
        steady = None
        if stats.first_ts is not None and stats.last_ts is not None and delivered > 1:
            span = stats.last_ts - stats.first_ts
            steady = (delivered - 1) / span if span > 0 else None
        cpu_ms = usage.cpu_s * 1000
        net_ms = (usage.cpu_s - startup) * 1000
        errors = []
        if usage.timed_out:
            errors.append(f"timed out after {self.timeout_s:.0f}s")
        if delivered != messages:
            errors.append(f"delivered {delivered} of {messages}")
        if failed or left:
            errors.append(f"{failed} failed, {left} left in queue")
        if any(usage.exit_codes):
            errors.append(f"exit codes {usage.exit_codes}")
        if errors:
            errors.append("log tail:\n" + self.log_tail())
        return DrainResult(
            scenario=scenario.name, rtt_ms=rtt_ms, workers=workers, processes=len(cmds), messages=messages,
            delivered=delivered, connections=stats.connections, ehlo=stats.ehlo, quit=stats.quit,
            failed_jobs=failed, left_in_queue=left, wall_s=wall,
            msgs_per_s=delivered / wall if wall else None, steady_msgs_per_s=steady,
            workers_exit_s=t_exit - t0, cpu_ms_total=cpu_ms,
            cpu_ms_per_msg=cpu_ms / delivered if delivered else None, startup_cpu_ms=startup * 1000,
            cpu_ms_per_msg_net=net_ms / delivered if delivered else None,
            peak_rss_mb=usage.peak_rss_kb / 1024, ok=not errors, error="; ".join(errors),
        )

    def _queue_state(self, scenario: Scenario) -> tuple[int, int]:
        conn: Redis = self.redis.client()
        failed = left = 0
        for name in scenario.queues:
            queue = Queue(name, connection=conn, serializer=JSONSerializer)
            left += queue.count
            failed += FailedJobRegistry(name, connection=conn, serializer=JSONSerializer).count
        return failed, left

    def enqueue_rate(self, case: EnqueueCase, n: int) -> EnqueueResult:
        if case.fn is None:
            return EnqueueResult(case.name, n, None, None, available=False, note=case.note)
        self.clean()
        env = self.env(smtp_port=self.sink.port)
        t0 = time.perf_counter()
        case.fn(n, env)
        seconds = time.perf_counter() - t0
        return EnqueueResult(case.name, n, seconds, n / seconds, available=True, note=case.note)
