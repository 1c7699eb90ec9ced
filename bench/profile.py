"""cProfile of the producer or of one worker process, against a private Redis and a bench sink.

``python -m bench.profile producer [--n 2000] [--one-by-one]`` — profiles ``dispatcher.enqueue_many``
(or ``dispatcher.enqueue`` in a loop) in this process.
``python -m bench.profile worker [--n 500] [--rtt 0] [--sink chunking|aiosmtpd]`` — enqueues n mails, then
runs ``python -m cProfile worker.py --burst`` (one process, no pool) through a delay proxy.

Prints the top functions by own time and by cumulative time (``--top``). py-spy is not installed here;
cProfile roughly doubles the cost of small Python functions, so read it for proportions, not totals.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from redis import Redis

from bench.delay_proxy import DelayProxy
from bench.redis_server import PrivateRedis
from bench.scenarios import PROJECT_ROOT, BenchEnv, dispatcher_mail
from bench.sink import SinkProcess


def _print_stats(stats: pstats.Stats, top: int) -> None:
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats.stream = out  # type: ignore[attr-defined]
        stats.sort_stats(key).print_stats(top)
        text = out.getvalue()
        print(f"--- top {top} by {key} ---")
        print(text[text.find("   ncalls"):] if "   ncalls" in text else text)


def profile_producer(n: int, one_by_one: bool, top: int) -> None:
    import dispatcher

    with PrivateRedis() as redis_server:
        conn = Redis.from_url(redis_server.url)
        env = BenchEnv(redis_server.url, "127.0.0.1", 25, "profile", n)
        mails = [dispatcher_mail(i, env) for i in range(n)]
        dispatcher.enqueue_many(mails[:50], connection=conn)  # warm imports and connection
        conn.flushdb()
        profiler = cProfile.Profile()
        t0 = time.perf_counter()
        profiler.enable()
        if one_by_one:
            for mail in mails:
                dispatcher.enqueue(mail, connection=conn)
        else:
            dispatcher.enqueue_many(mails, connection=conn)
        profiler.disable()
        seconds = time.perf_counter() - t0
        print(f"{'enqueue x' + str(n) if one_by_one else 'enqueue_many(' + str(n) + ')'}: {seconds:.3f} s "
              f"under cProfile = {n / seconds:.0f} mails/s; redis keys: {conn.dbsize()}")
        _print_stats(pstats.Stats(profiler), top)


def profile_worker(n: int, rtt_ms: float, sink_name: str, top: int) -> None:
    import dispatcher

    module = "bench.chunking_sink" if sink_name == "chunking" else "bench.sink"
    with PrivateRedis() as redis_server, SinkProcess(module=module) as sink, \
            DelayProxy("127.0.0.1", sink.port, rtt_ms / 2000) as proxy, \
            tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        env = BenchEnv(redis_server.url, "127.0.0.1", proxy.port, "profile", n)
        dispatcher.enqueue_many([dispatcher_mail(i, env) for i in range(n)],
                                connection=Redis.from_url(redis_server.url))
        out = Path(tmp) / "worker.prof"
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "cProfile", "-o", str(out), str(PROJECT_ROOT / "worker.py"), "--burst"],
            env={**env.process_env(), "PATH": "/usr/bin:/bin"}, cwd=PROJECT_ROOT, timeout=300,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False,
        )
        seconds = time.monotonic() - t0
        stats = sink.stats()
        print(f"worker --burst: {stats.messages}/{n} delivered in {seconds:.2f} s (rc={proc.returncode}, "
              f"sink {sink_name}, rtt {rtt_ms:.0f} ms)")
        if proc.returncode:
            print(proc.stderr[-2000:])
        if out.exists():
            _print_stats(pstats.Stats(str(out)), top)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("what", choices=["producer", "worker"])
    parser.add_argument("--n", type=int, default=None, help="mails (producer 2000, worker 500)")
    parser.add_argument("--one-by-one", action="store_true", help="producer: dispatcher.enqueue in a loop")
    parser.add_argument("--rtt", type=float, default=0.0, help="worker: round trip in ms")
    parser.add_argument("--sink", choices=["chunking", "aiosmtpd"], default="chunking")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    if args.what == "producer":
        profile_producer(args.n or 2000, args.one_by_one, args.top)
    else:
        profile_worker(args.n or 500, args.rtt, args.sink, args.top)


if __name__ == "__main__":
    main()
