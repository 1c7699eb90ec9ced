"""Redis commands per delivered mail, and the worker's CPU per mail, for one ``worker.py --burst``.

``python -m bench.redis_commands [--n 500] [--sink chunking|aiosmtpd] [--no-monitor] [--no-hiredis]``

Starts a private Redis and a bench sink, enqueues ``n`` mails with ``dispatcher.enqueue_many`` (not
counted), then runs one ``worker.py --burst`` process while a thread reads ``MONITOR``. Every command the
worker's process tree sent (``client``) and every command a script ran inside Redis (``lua``, tagged so by
MONITOR) is counted, by name and by owner: the first key names it (``rq:`` keys are rq's, ``dispatch:``
keys ours); a MULTI/EXEC goes to the owner of the transaction's commands; commands with no key are
``other`` (PING, CLIENT, SCRIPT...). Start-up and shutdown of the worker are included, spread over the
mails. The worker's CPU (user + sys, its children included) comes from ``os.wait4``; a burst over the
empty queue first measures what start-up and shutdown cost, and that is taken off the CPU per mail.

``--no-hiredis`` hides an installed hiredis from the worker (a shadow module that fails to import, first
on its PYTHONPATH) so redis-py falls back to its pure-Python parser: the same venv measures both parsers.
``--no-monitor`` measures CPU without MONITOR's load on Redis. ``--rounds R`` alternates both parsers R
times each (the hiredis comparison), printing CPU per mail for every run and the median and spread.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from redis import Redis

from bench.redis_server import PrivateRedis
from bench.scenarios import PROJECT_ROOT, BenchEnv, dispatcher_mail
from bench.sink import SinkProcess

_TOKEN = re.compile(rb'"((?:[^"\\]|\\.)*)"')
_END_MARK = b"bench-redis-commands-end"


@dataclass
class CommandCount:
    """What one burst cost: ``client`` and ``lua`` commands keyed by ``(owner, COMMAND)``."""

    delivered: int
    mails: int
    client: Counter[tuple[str, str]] = field(default_factory=Counter)
    lua: Counter[tuple[str, str]] = field(default_factory=Counter)
    cpu_seconds: float = 0.0
    idle_cpu_seconds: float = 0.0
    """The CPU of the same burst over an empty queue (imports, start, stop): taken off per mail."""
    wall_seconds: float = 0.0
    returncode: int = 0

    @property
    def client_total(self) -> int:
        return sum(self.client.values())

    @property
    def lua_total(self) -> int:
        return sum(self.lua.values())

    def per_mail(self, count: int) -> float:
        return count / self.delivered if self.delivered else float("nan")

    @property
    def cpu_ms_per_mail(self) -> float:
        """Worker CPU (user + sys) per delivered mail, the idle burst's taken off."""
        spent = self.cpu_seconds - self.idle_cpu_seconds
        return spent * 1000 / self.delivered if self.delivered else float("nan")


def _owner(args: list[bytes]) -> str:
    """Whose command this is, by its first key (EVALSHA's come after the sha and the key count)."""
    name = args[0].upper()
    key = b""
    if name in (b"EVALSHA", b"EVAL", b"EVALSHA_RO", b"EVAL_RO", b"FCALL"):
        if len(args) > 3 and args[2] != b"0":
            key = args[3]
    elif len(args) > 1:
        key = args[1]
    if key.startswith(b"rq:"):
        return "rq"
    if key.startswith(b"dispatch:"):
        return "dispatcher"
    return "other"


class _Monitor(threading.Thread):
    """Reads MONITOR until the end mark; counts into ``client`` / ``lua``."""

    def __init__(self, url: str) -> None:
        super().__init__(name="monitor", daemon=True)
        self.client: Counter[tuple[str, str]] = Counter()
        self.lua: Counter[tuple[str, str]] = Counter()
        self._redis = Redis.from_url(url)
        self._monitor = self._redis.monitor()  # type: ignore[no-untyped-call]
        self._monitor.__enter__()  # sends MONITOR now: nothing after start() is missed
        self._open: dict[bytes, list[tuple[str, str]]] = {}  # client -> its MULTI's commands so far

    def run(self) -> None:
        connection = self._monitor.connection
        while True:
            line = connection.read_response()
            if not isinstance(line, bytes) or b"] " not in line:
                continue
            head, _, rest = line.partition(b"] ")
            origin = head.rsplit(b" ", 1)[-1]
            args = [m.group(1) for _, m in zip(range(4), _TOKEN.finditer(rest), strict=False)]
            if not args:
                continue
            if _END_MARK in args:
                return
            self._count(origin, args)

    def _count(self, origin: bytes, args: list[bytes]) -> None:
        name = args[0].upper().decode()
        if origin == b"lua":
            self.lua[(_owner(args), name)] += 1
            return
        if name == "MULTI":
            self._open[origin] = []
            return
        if name in ("EXEC", "DISCARD") and origin in self._open:
            inside = self._open.pop(origin)
            owner = Counter(o for o, _ in inside).most_common(1)[0][0] if inside else "other"
            self.client[(owner, "MULTI")] += 1
            self.client[(owner, name)] += 1
            for each in inside:
                self.client[each] += 1
            return
        entry = (_owner(args), name)
        if origin in self._open:
            self._open[origin].append(entry)
        else:
            self.client[entry] += 1

    def finish(self) -> None:
        self._redis.echo(_END_MARK)
        self.join(timeout=60)
        self._monitor.__exit__(None, None, None)
        self._redis.close()


def _shadow_hiredis(directory: Path) -> Path:
    """A directory with a ``hiredis`` module that fails to import (redis-py then parses in Python)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "hiredis.py").write_text('raise ImportError("hidden by bench.redis_commands")\n')
    return directory


def _burst(process_env: dict[str, str]) -> tuple[int, float, float]:
    """Run ``worker.py --burst``: its exit code, CPU seconds (user + sys, children included) and wall."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "worker.py"), "--burst"], env=process_env, cwd=PROJECT_ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime, time.monotonic() - t0


def count_commands(
    n: int = 500, *, sink_module: str = "bench.chunking_sink", monitor: bool = True, hiredis: bool = True
) -> CommandCount:
    """Enqueue ``n`` mails, deliver them with one ``worker.py --burst``, and count what it cost Redis."""
    import dispatcher

    with PrivateRedis() as redis_server, SinkProcess(module=sink_module) as sink, \
            tempfile.TemporaryDirectory(prefix="bench-commands-") as tmp:  # fmt: skip
        env = BenchEnv(redis_server.url, "127.0.0.1", sink.port, "commands", n)
        conn = Redis.from_url(redis_server.url)
        process_env = {**env.process_env(), "PATH": "/usr/bin:/bin"}
        if not hiredis:
            shadow = _shadow_hiredis(Path(tmp) / "no-hiredis")
            process_env["PYTHONPATH"] = f"{shadow}{os.pathsep}{process_env['PYTHONPATH']}"
        _, idle_cpu, _ = _burst(process_env)
        dispatcher.enqueue_many([dispatcher_mail(i, env) for i in range(n)], connection=conn)
        watcher = _Monitor(redis_server.url) if monitor else None
        if watcher is not None:
            watcher.start()
        returncode, cpu, wall = _burst(process_env)
        if watcher is not None:
            watcher.finish()
        result = CommandCount(delivered=sink.stats().messages, mails=n, wall_seconds=wall, cpu_seconds=cpu,
                              idle_cpu_seconds=idle_cpu, returncode=returncode)  # fmt: skip
        if watcher is not None:
            result.client, result.lua = watcher.client, watcher.lua
        conn.close()
        return result


def print_table(result: CommandCount) -> None:
    print(f"delivered {result.delivered}/{result.mails} (rc={result.returncode}) in "
          f"{result.wall_seconds:.2f} s; worker CPU {result.cpu_ms_per_mail:.3f} ms/mail "
          f"(idle burst {result.idle_cpu_seconds:.2f} s taken off)")  # fmt: skip
    if not result.client:
        return  # run without MONITOR: nothing counted
    print(f"commands per delivered mail: client {result.per_mail(result.client_total):.2f}, "
          f"inside scripts {result.per_mail(result.lua_total):.2f}")
    for title, counts in (("sent by the client", result.client), ("run inside scripts (lua)", result.lua)):
        print(f"--- {title} ---")
        print(f"{'owner':<11} {'command':<14} {'total':>8} {'per mail':>9}")
        for (owner, name), count in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"{owner:<11} {name:<14} {count:>8} {result.per_mail(count):>9.2f}")
        by_owner = Counter[str]()
        for (owner, _), count in counts.items():
            by_owner[owner] += count
        print("  by owner: " + ", ".join(f"{o} {result.per_mail(c):.2f}" for o, c in by_owner.most_common()))


def compare_parsers(n: int, rounds: int, sink_module: str) -> None:
    """Alternate hiredis and the Python parser ``rounds`` times each (no MONITOR); CPU per mail each run."""
    runs: dict[bool, list[float]] = {True: [], False: []}
    for round_no in range(rounds):
        for hiredis in (True, False) if round_no % 2 == 0 else (False, True):
            result = count_commands(n, sink_module=sink_module, monitor=False, hiredis=hiredis)
            runs[hiredis].append(result.cpu_ms_per_mail)
            print(f"round {round_no + 1} {'hiredis' if hiredis else 'python '}: {result.cpu_ms_per_mail:.3f} "
                  f"ms/mail ({result.delivered}/{n} delivered, {result.wall_seconds:.2f} s)", flush=True)
    for hiredis, values in runs.items():
        print(f"{'hiredis' if hiredis else 'python parser'}: median {statistics.median(values):.3f} ms/mail, "
              f"min {min(values):.3f}, max {max(values):.3f} over {len(values)} runs")


def client_cpu(n: int, rounds: int) -> None:
    """In this process: client CPU (``process_time``) of reading one send's record and of writing one
    outcome (``SendStore.record_outcome``), with hiredis and with redis-py's Python parser, ``rounds``
    times each alternated; prints the minimum and median in microseconds."""
    from redis._parsers import _HiredisParser, _RESP2Parser

    import dispatcher
    from dispatcher.queue.states import SendState
    from dispatcher.queue.store import SendStore

    runs: dict[str, list[tuple[float, float]]] = {}
    with PrivateRedis() as server:
        env = BenchEnv(server.url, "127.0.0.1", 25, "client-cpu", 1)
        [send_id] = dispatcher.enqueue_many([dispatcher_mail(0, env)], connection=server.client())
        for parser in ("hiredis", "python") * rounds:
            parser_class = _HiredisParser if parser == "hiredis" else _RESP2Parser
            conn = Redis.from_url(server.url, parser_class=parser_class)
            store = SendStore(conn)
            t0 = time.process_time()
            for _ in range(n):
                rec = store.load(send_id)
            load = (time.process_time() - t0) / n * 1e6
            assert rec is not None
            rec.state = SendState.DELIVERED
            t0 = time.process_time()
            for _ in range(n):
                rec.stored_state = SendState.SENDING
                store.record_outcome(rec, ["user@example.org"], now=time.time())
            write = (time.process_time() - t0) / n * 1e6
            runs.setdefault(parser, []).append((load, write))
            conn.close()
    for parser, values in runs.items():
        loads, writes = [v[0] for v in values], [v[1] for v in values]
        print(f"{parser:<8} record read: min {min(loads):.0f} us, median {statistics.median(loads):.0f} us; "
              f"outcome write: min {min(writes):.0f} us, median {statistics.median(writes):.0f} us")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.redis_commands", description=__doc__)
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--sink", choices=["chunking", "aiosmtpd"], default="chunking")
    parser.add_argument("--no-monitor", action="store_true")
    parser.add_argument("--no-hiredis", action="store_true")
    parser.add_argument("--rounds", type=int, default=0, help="alternate both parsers this many times each")
    parser.add_argument("--client-cpu", action="store_true",
                        help="in-process client CPU of a record read and an outcome write, per parser")
    args = parser.parse_args(argv)
    if args.client_cpu:
        client_cpu(args.n, args.rounds or 3)
        return
    module = "bench.chunking_sink" if args.sink == "chunking" else "bench.sink"
    if args.rounds:
        compare_parsers(args.n, args.rounds, module)
        return
    print_table(count_commands(args.n, sink_module=module, monitor=not args.no_monitor,
                               hiredis=not args.no_hiredis))  # fmt: skip


if __name__ == "__main__":
    main()
