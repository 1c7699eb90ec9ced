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
The rest of the machine's CPU during a drain (sink, Redis, delay proxy thread, harness) comes from
``/proc`` snapshots (:mod:`bench.cpu`) and lands in ``cpu_split_ms`` with the workers' share, so a
saturated 2-core box shows who is using it (``busy_cores`` = all of it / wall time).

Two sinks run for the whole invocation: ``aiosmtpd`` (PIPELINING) and ``chunking`` (PIPELINING +
CHUNKING, :mod:`bench.chunking_sink`); a :class:`Scenario` names the one it talks to.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from redis import Redis
from rq import Queue
from rq.registry import FailedJobRegistry
from rq.serializers import JSONSerializer

from bench.commands import CommandResult, MonitorCounter
from bench.cpu import CpuSampler, CpuWatch, descendants, main_thread_tid
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
    sink: str
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
    cpu_split_ms: dict[str, float] = field(default_factory=dict)  # workers, sink, redis, proxy, harness
    busy_cores: float | None = None  # sum of cpu_split_ms / workers_exit_s
    steady_cpu_split_ms: dict[str, float] = field(default_factory=dict)  # same, first..last mail only
    steady_busy_cores: float | None = None
    steady_window_s: float | None = None
    peak_pss_mb: float | None = None  # max sampled sum of PSS over all worker processes (every ~100 ms)
    peak_procs: int | None = None  # max sampled number of live worker processes (a pool's children too)
    round: int = 1  # scenario 5 runs each cell in rounds
    # worker CPU ms by process kind (Scenario.kinds: "supervisor", "worker", "rq scheduler", ...), from the
    # last own-CPU reading of each process; "exit (unsampled)" = the exact wait4 total minus their sum
    cpu_kinds_ms: dict[str, float] = field(default_factory=dict)
    startup_kinds_ms: dict[str, float] = field(default_factory=dict)  # the same for the start-up run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


UNSAMPLED = "exit (unsampled)"


def _kinds_ms(sampler: CpuSampler, kinds: tuple[str, ...], total_s: float) -> dict[str, float]:
    """CPU ms per process kind, plus UNSAMPLED: the exact wait4 total minus what the samples saw."""
    out = {k: round(v * 1000, 1) for k, v in sampler.kind_split_s(kinds).items()}
    out[UNSAMPLED] = round(total_s * 1000 - sum(out.values()), 1)
    return out


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
        self.sinks: dict[str, SinkProcess] = {
            "aiosmtpd": SinkProcess(log=self._log),
            "chunking": SinkProcess(log=self._log, module="bench.chunking_sink"),
        }
        self.sink = self.sinks["aiosmtpd"]
        self._startup_cache: dict[tuple[tuple[str, ...], ...], tuple[float, dict[str, float]]] = {}

    def start(self) -> Lab:
        self.redis.start()
        for sink in self.sinks.values():
            sink.start()
        return self

    def stop(self) -> None:
        for sink in self.sinks.values():
            sink.stop()
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
        for sink in self.sinks.values():
            sink.reset()

    def log_tail(self, lines: int = 15, width: int = 240) -> str:
        """Last lines of the workers' log, each cut to ``width`` (tracebacks in JSON are one long line)."""
        self._log.flush()
        tail = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(line if len(line) <= width else line[:width] + " ..." for line in tail)

    def run_processes(
        self, cmds: list[list[str]], env: BenchEnv, sampler: CpuSampler | None = None
    ) -> ProcUsage:
        """Spawn every command, wait for all (bounded by timeout_s), sum their rusage.

        On timeout each worker's process group is killed, and so is every descendant found under it
        (a pool's children run in sessions of their own and would survive a group kill).
        """
        proc_env = {**os.environ, **env.process_env()}
        procs = [
            subprocess.Popen(cmd, env=proc_env, cwd=env.project_root, stdout=self._log, stderr=self._log,
                             stdin=subprocess.DEVNULL, start_new_session=True)
            for cmd in cmds
        ]
        usage = ProcUsage()
        codes: list[int] = []
        pending = {p.pid: p for p in procs}
        if sampler is not None:
            sampler.roots = list(pending)
        deadline = time.monotonic() + self.timeout_s
        while pending:
            if sampler is not None:
                sampler.sample(time.monotonic())
            for pid in list(pending):
                done_pid, status, rusage = os.wait4(pid, os.WNOHANG)
                if done_pid == 0:
                    continue
                proc = pending.pop(pid)
                proc.returncode = os.waitstatus_to_exitcode(status)
                codes.append(proc.returncode)
                usage.cpu_s += rusage.ru_utime + rusage.ru_stime
                if sampler is not None:
                    sampler.final[pid] = rusage.ru_utime + rusage.ru_stime
                usage.peak_rss_kb = max(usage.peak_rss_kb, rusage.ru_maxrss)
            if pending and time.monotonic() > deadline:
                usage.timed_out = True
                for pid in pending:  # each worker runs in its own session: kill exactly that group
                    strays = descendants(pid)
                    os.killpg(pid, signal.SIGKILL)
                    for stray in strays:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(stray, signal.SIGKILL)
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
        return self.startup(scenario, workers)[0]

    def startup(self, scenario: Scenario, workers: int) -> tuple[float, dict[str, float]]:
        """CPU the worker processes burn with nothing to do (imports, registration, exit): seconds in
        total and ms by process kind (as in ``DrainResult.cpu_kinds_ms``).

        Cached per command line, so the same workers against another sink are not measured twice.
        """
        env = self.env(smtp_port=self.sinks[scenario.sink].port, messages=0)
        cmds = scenario.worker_cmds(env, workers)
        key = tuple(tuple(cmd) for cmd in cmds)
        if key not in self._startup_cache:
            self.clean()
            sampler = CpuSampler(CpuWatch())
            usage = self.run_processes(cmds, env, sampler)
            self._startup_cache[key] = usage.cpu_s, _kinds_ms(sampler, scenario.kinds(workers), usage.cpu_s)
        return self._startup_cache[key]

    def _cpu_watch(self, proxy: DelayProxy, sink: SinkProcess) -> CpuWatch:
        pids = {"sink": sink.pid, "redis": self.redis.pid}
        tids = {"proxy": proxy.thread_id, "harness": main_thread_tid()}
        return CpuWatch(pids={k: v for k, v in pids.items() if v is not None},
                        tids={k: v for k, v in tids.items() if v is not None})

    def drain(self, scenario: Scenario, rtt_ms: float, workers: int, messages: int) -> DrainResult:
        startup, startup_kinds = self.startup(scenario, workers)
        sink = self.sinks[scenario.sink]
        self.clean()
        with DelayProxy("127.0.0.1", sink.port, rtt_ms / 2000.0) as proxy:
            env = self.env(smtp_port=proxy.port, messages=messages)
            scenario.enqueue(messages, env)
            cmds = scenario.worker_cmds(env, workers)
            watch = self._cpu_watch(proxy, sink).start()
            sampler = CpuSampler(watch)
            t0 = time.monotonic()
            usage = self.run_processes(cmds, env, sampler)
            t_exit = time.monotonic()
            split = {"workers": round(usage.cpu_s * 1000, 1), **watch.split_ms()}
        stats = sink.stats()
        window = sampler.window(stats.first_ts, stats.last_ts)
        kinds = _kinds_ms(sampler, scenario.kinds(workers), usage.cpu_s)
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
            scenario=scenario.name, sink=scenario.sink, rtt_ms=rtt_ms, workers=workers, processes=len(cmds),
            messages=messages,
            delivered=delivered, connections=stats.connections, ehlo=stats.ehlo, quit=stats.quit,
            failed_jobs=failed, left_in_queue=left, wall_s=wall,
            msgs_per_s=delivered / wall if wall else None, steady_msgs_per_s=steady,
            workers_exit_s=t_exit - t0, cpu_ms_total=cpu_ms,
            cpu_ms_per_msg=cpu_ms / delivered if delivered else None, startup_cpu_ms=startup * 1000,
            cpu_ms_per_msg_net=net_ms / delivered if delivered else None,
            peak_rss_mb=usage.peak_rss_kb / 1024, ok=not errors, error="; ".join(errors),
            cpu_split_ms=split, busy_cores=sum(split.values()) / 1000 / (t_exit - t0),
            steady_cpu_split_ms=window[0] if window else {},
            steady_busy_cores=sum(window[0].values()) / 1000 / window[1] if window else None,
            steady_window_s=window[1] if window else None,
            peak_pss_mb=sampler.peak_pss_kb / 1024 if sampler.peak_pss_kb else None,
            peak_procs=sampler.peak_procs or None, cpu_kinds_ms=kinds, startup_kinds_ms=startup_kinds,
        )

    def count_commands(self, scenario: Scenario, workers: int, messages: int) -> CommandResult:
        """One more drain at 0 ms RTT, untimed, with MONITOR counting the workers' Redis commands.

        MONITOR starts after the fill and stops once every worker process has exited, so only the
        workers' commands (start-up and exit included) are counted.
        """
        sink = self.sinks[scenario.sink]
        self.clean()
        with DelayProxy("127.0.0.1", sink.port, 0.0) as proxy:
            env = self.env(smtp_port=proxy.port, messages=messages)
            scenario.enqueue(messages, env)
            counter = MonitorCounter("127.0.0.1", self.redis.port).start()
            try:
                usage = self.run_processes(scenario.worker_cmds(env, workers), env)
            finally:
                count = counter.stop()
        delivered = sink.stats().messages
        errors = [e for e in (counter.error,) if e]
        if usage.timed_out:
            errors.append(f"timed out after {self.timeout_s:.0f}s")
        if delivered != messages:
            errors.append(f"delivered {delivered} of {messages}")
        if any(usage.exit_codes):
            errors.append(f"exit codes {usage.exit_codes}")

        def per_mail(n: int) -> float | None:
            return n / delivered if delivered else None

        return CommandResult(
            scenario=scenario.name, workers=workers, messages=messages, delivered=delivered,
            client=count.client, lua=count.lua, client_per_mail=per_mail(count.client),
            lua_per_mail=per_mail(count.lua), total_per_mail=per_mail(count.client + count.lua),
            top=count.top(), ok=not errors, error="; ".join(errors),
        )

    def probe_rtt_ms(self, rtt_ms: float, rounds: int = 20) -> float:
        """Effective round trip through a fresh proxy: NOOP ping-pong with the CHUNKING sink (median).

        The proxy's timers fire a little late (epoll waits in whole ms), so this is slightly above the
        nominal RTT; 1000 / this is the ceiling for one connection at one round trip per message.
        """
        with DelayProxy("127.0.0.1", self.sinks["chunking"].port, rtt_ms / 2000.0) as proxy, \
                socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            file = sock.makefile("rb")
            file.readline()
            times = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                sock.sendall(b"NOOP\r\n")
                file.readline()
                times.append(time.perf_counter() - t0)
            sock.sendall(b"QUIT\r\n")
            file.readline()
        self.sinks["chunking"].reset()
        return statistics.median(times) * 1000

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
        n = min(n, case.max_n) if case.max_n else n
        self.clean()
        env = self.env(smtp_port=self.sink.port)
        t0 = time.perf_counter()
        case.fn(n, env)
        seconds = time.perf_counter() - t0
        return EnqueueResult(case.name, n, seconds, n / seconds, available=True, note=case.note)
