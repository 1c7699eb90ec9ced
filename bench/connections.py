"""One process with K connections against C processes: ``python -m bench.connections``.

    python -m bench.connections [--n 320] [--rtt 100] [--runs c1k16,c16k1,c1k16b64] [--rounds 1]

A run ``cCkK`` is ``worker.py --burst --concurrency C --connections K`` (``cCkKbB``: in jobs of B). Each
gets a fresh private Redis, the aiosmtpd sink (``bench.sink``, PIPELINING) behind a delay proxy of
``--rtt`` ms, and ``--n`` mails enqueued with ``dispatcher.enqueue_many``. Rounds are interleaved (every
run sees the same load). It prints, per run: drain msg/s (delivered / from the workers' start to the last
mail at the sink, as ``bench.harness`` counts it), steady msg/s (first to last mail), the connections the
sink saw, the peak of the summed PSS of every worker process (``/proc/<pid>/smaps_rollup``, sampled every
100 ms) and the workers' CPU per mail (``os.wait4``: start-up included).

``--batch B`` is an experiment, not a setting: sends per job (the producer's ``JOB_BATCH_SIZE``, 20), set in
the bench's producer and in the workers (``python -c`` patching both constants before ``worker.py``'s
``main``), to measure what larger jobs do for one process with K connections.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

from redis import Redis

from bench.baselines import make_mail
from bench.cpu import descendants, pss_kb
from bench.delay_proxy import DelayProxy
from bench.redis_server import PrivateRedis
from bench.scenarios import PROJECT_ROOT, BenchEnv
from bench.sink import SinkProcess


@dataclass(frozen=True)
class Run:
    processes: int
    connections: int
    batch: int | None = None
    """Sends per job for this run (``bB``), else ``--batch``."""

    @classmethod
    def parse(cls, text: str) -> Run:
        match = re.fullmatch(r"c(\d+)k(\d+)(?:b(\d+))?", text)
        if match is None:
            raise argparse.ArgumentTypeError(f"a run is cCkK[bB], e.g. c1k16 or c1k16b64: {text!r}")
        return cls(int(match[1]), int(match[2]), int(match[3]) if match[3] else None)

    @property
    def name(self) -> str:
        jobs = f" (jobs of {self.batch})" if self.batch else ""
        return f"--concurrency {self.processes} --connections {self.connections}{jobs}"


@dataclass(frozen=True)
class Result:
    delivered: int
    drain: float
    steady: float | None
    connections: int
    pss_mb: float
    cpu_ms_per_mail: float


WORKER_WITH_BATCH = """
import sys
import dispatcher.queue.producer as producer, dispatcher.worker.process as process
producer.JOB_BATCH_SIZE = process.JOB_BATCH_SIZE = int(sys.argv[1])
from dispatcher.worker.pool import main
sys.exit(main(sys.argv[2:]))
"""


def drain(run: Run, n: int, rtt_ms: float, batch: int, log: str | None = None) -> Result:
    import dispatcher
    import dispatcher.queue.producer as producer

    producer.JOB_BATCH_SIZE = batch

    with PrivateRedis() as redis_server, SinkProcess() as sink, \
            DelayProxy("127.0.0.1", sink.port, rtt_ms / 2000) as proxy:  # fmt: skip
        env = BenchEnv(redis_server.url, "127.0.0.1", proxy.port, "connections", n)
        dispatcher.enqueue_many(
            [make_mail(i, env.run_id) for i in range(n)], connection=Redis.from_url(env.redis_url)
        )
        args = ["--burst", "--concurrency", str(run.processes), "--connections", str(run.connections)]
        started = time.monotonic()
        level = "INFO" if log else "WARNING"
        variables = {**env.process_env(), "PATH": "/usr/bin:/bin", "DISPATCH_LOG_LEVEL": level}
        command = [sys.executable, "-c", WORKER_WITH_BATCH, str(batch), *args]
        with open(log or "/dev/null", "ab") as stderr:
            worker = subprocess.Popen(
                command, env=variables, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=stderr
            )
        peak_kb, cpu_s = 0, 0.0
        while True:
            pid, status, usage = os.wait4(worker.pid, os.WNOHANG)  # a reaped pool's rusage has its children
            if pid:
                worker.returncode = os.waitstatus_to_exitcode(status)
                cpu_s = usage.ru_utime + usage.ru_stime
                break
            peak_kb = max(peak_kb, sum(pss_kb(pid) for pid in [worker.pid, *descendants(worker.pid)]))
            time.sleep(0.1)  # the sampling period
        stats = sink.stats()
    last, first = stats.last_ts, stats.first_ts
    wall = (last - started) if last is not None else None
    steady = (
        (stats.messages - 1) / (last - first)
        if last is not None and first is not None and last > first
        else None
    )
    drained = stats.messages / wall if wall else 0.0
    per_mail = cpu_s * 1000 / stats.messages if stats.messages else 0.0
    return Result(stats.messages, drained, steady, stats.connections, peak_kb / 1024, per_mail)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.connections", description=__doc__)
    parser.add_argument("--n", type=int, default=320, help="mails per run (default 320)")
    parser.add_argument("--rtt", type=float, default=100.0, help="round trip through the proxy, ms")
    parser.add_argument("--runs", type=lambda v: [Run.parse(x) for x in v.split(",")],
                        default=[Run(1, 16), Run(16, 1)], help="cCkK,... (default c1k16,c16k1)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every run; the median is printed")
    parser.add_argument("--batch", type=int, default=20, help="experiment: sends per job (default 20)")
    parser.add_argument("--log", default=None, help="append the workers' INFO logs to this file")
    args = parser.parse_args(argv)
    print(f"{args.n} mails in jobs of {args.batch}, {args.rtt:g} ms RTT, {args.rounds} round(s), median")
    results: dict[Run, list[Result]] = {run: [] for run in args.runs}
    for _ in range(args.rounds):  # rounds interleaved: every run sees the same load of the machine
        for run in args.runs:
            results[run].append(drain(run, args.n, args.rtt, run.batch or args.batch, args.log))
    head = f"{'delivered':>9} {'drain/s':>8} {'steady/s':>8} {'conns':>5} {'PSS MB':>7} {'CPU ms/mail':>11}"
    print(f"{'worker.py':50} {head}")
    for run, done in results.items():
        steady = [r.steady for r in done if r.steady is not None]
        print(
            f"{run.name:50} {min(r.delivered for r in done):>9} "
            f"{statistics.median(r.drain for r in done):>8.1f} "
            f"{statistics.median(steady) if steady else float('nan'):>8.1f} "
            f"{max(r.connections for r in done):>5} {statistics.median(r.pss_mb for r in done):>7.1f} "
            f"{statistics.median(r.cpu_ms_per_mail for r in done):>11.2f}"
        )


if __name__ == "__main__":
    main()
