"""CPU time of the bench's helper processes and threads, read from ``/proc`` (Linux only).

Workers are measured exactly with ``os.wait4`` when they exit; the helpers live on, so a drain takes a
snapshot of each before spawning the workers and after they exited and charges the difference:
``sink`` and ``redis`` (their own processes), ``proxy`` (the delay proxy's event-loop thread in this
process) and ``harness`` (this process's main thread: polling ``wait4`` every 5 ms).

A whole drain includes interpreter start-up, which dominates short runs. :class:`CpuSampler` therefore
also samples every ~100 ms while workers run (worker process trees via ``/proc/<pid>/task/*/children``,
reaped children via ``cutime``/``cstime``), so the split can be cut to the steady window between the
first and the last mail at the sink: that is where "are the 2 cores saturated, and by whom" is answered.
On a system without ``/proc`` every reading is 0 and the split is simply empty.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def stat_cpu_s(path: Path, waited_children: bool = False) -> float:
    """utime + stime (+ cutime + cstime) of a ``/proc/.../stat`` file in seconds; 0.0 if gone."""
    try:
        raw = path.read_text()
    except OSError:
        return 0.0
    # the command name (field 2) may contain spaces and parentheses: split after the last ")"
    fields = raw[raw.rfind(")") + 2 :].split()
    ticks = int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    if waited_children:
        ticks += int(fields[13]) + int(fields[14])  # 16 and 17: children already reaped
    return ticks / _TICK


def children(pid: int) -> list[int]:
    """Live children of a process (needs CONFIG_PROC_CHILDREN; [] otherwise)."""
    found: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return found
    for task in tasks:
        try:
            found.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return found


def descendants(pid: int, limit: int = 1000) -> list[int]:
    """Every live descendant of ``pid`` (bounded walk)."""
    out: list[int] = []
    stack = children(pid)
    while stack and len(out) < limit:
        child = stack.pop()
        out.append(child)
        stack.extend(children(child))
    return out


def tree_with_depth(root: int, limit: int = 1000) -> list[tuple[int, int]]:
    """``(pid, depth)`` of a process (depth 0) and every live descendant (bounded walk)."""
    out: list[tuple[int, int]] = []
    stack = [(root, 0)]
    while stack and len(out) < limit:
        pid, depth = stack.pop()
        out.append((pid, depth))
        stack.extend((child, depth + 1) for child in children(pid))
    return out


def tree_cpu_s(pid: int) -> float:
    """CPU of a process, its reaped children and its live descendants."""
    return sum(stat_cpu_s(Path(f"/proc/{p}/stat"), waited_children=True) for p in [pid, *descendants(pid)])


def pss_kb(pid: int) -> int:
    """Proportional set size of one process (``/proc/<pid>/smaps_rollup``), 0 if gone or unreadable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_cpu_s(pid: int) -> float:
    return stat_cpu_s(Path(f"/proc/{pid}/stat"))


def thread_cpu_s(tid: int) -> float:
    """A thread of this process (``threading.Thread.native_id``)."""
    return stat_cpu_s(Path(f"/proc/self/task/{tid}/stat"))


@dataclass
class CpuWatch:
    """Named processes (pids) and threads of this process (tids); ``split_ms()`` = CPU since ``start()``."""

    pids: dict[str, int] = field(default_factory=dict)
    tids: dict[str, int] = field(default_factory=dict)
    _start: dict[str, float] = field(default_factory=dict)

    def read(self) -> dict[str, float]:
        values = {name: process_cpu_s(pid) for name, pid in self.pids.items()}
        values.update({name: thread_cpu_s(tid) for name, tid in self.tids.items()})
        return values

    def start(self) -> CpuWatch:
        self._start = self.read()
        return self

    def split_ms(self) -> dict[str, float]:
        now = self.read()
        return {name: round((now[name] - self._start.get(name, 0.0)) * 1000, 1) for name in now}


def main_thread_tid() -> int:
    tid = threading.main_thread().native_id
    return tid if tid is not None else os.getpid()


def own_cpu_s(pid: int) -> float | None:
    """utime + stime of one process (its threads, not its children); None once it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


@dataclass
class CpuSampler:
    """Samples worker trees and helpers while a drain runs; ``window()`` = split between two instants.

    It also keeps the last reading of each worker process's **own** CPU (every ``own_interval_s``) and
    its depth under the command the harness started (0 = that process, 1 = its children, ...), so
    ``kind_split_s`` can say which kind of process spent the CPU (supervisor / worker / rq scheduler;
    Celery parent / children). A process's last ``own_interval_s`` before it exits is not seen: the
    harness reports the difference to the exact ``wait4`` total as ``exit (unsampled)``.
    """

    watch: CpuWatch
    interval_s: float = 0.1
    own_interval_s: float = 0.025
    roots: list[int] = field(default_factory=list)
    depth: dict[int, int] = field(default_factory=dict)  # every worker process seen -> depth in its tree
    own_last: dict[int, float] = field(default_factory=dict)  # last own CPU s read per process
    parents: set[int] = field(default_factory=set)  # roots seen with children
    _own_at: float = -1.0
    final: dict[int, float] = field(default_factory=dict)  # exact rusage of reaped roots
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)
    peak_pss_kb: int = 0  # max over samples of the summed PSS of every live worker process
    peak_procs: int = 0  # max over samples of the number of live worker processes (roots + descendants)

    def sample(self, now: float, force: bool = False) -> None:
        if force or now - self._own_at >= self.own_interval_s:
            self._own_at = now
            self._read_own()
        if not force and self.samples and now - self.samples[-1][0] < self.interval_s:
            return
        workers = 0.0
        pss = procs = 0
        for root in self.roots:
            self.depth.setdefault(root, 0)
            if root in self.final:
                workers += self.final[root]
                continue
            with_depth = tree_with_depth(root)
            if len(with_depth) > 1:
                self.parents.add(root)
            for pid, depth in with_depth:
                self.depth.setdefault(pid, depth)
            tree = [pid for pid, _ in with_depth]
            workers += sum(stat_cpu_s(Path(f"/proc/{p}/stat"), waited_children=True) for p in tree)
            pss += sum(pss_kb(p) for p in tree)
            procs += len(tree)
        self.peak_pss_kb = max(self.peak_pss_kb, pss)
        self.peak_procs = max(self.peak_procs, procs)
        self.samples.append((now, {"workers": workers, **self.watch.read()}))

    def _read_own(self) -> None:
        for pid in self.depth:
            if pid in self.final:  # a reaped root: its pid may already belong to someone else
                continue
            cpu = own_cpu_s(pid)
            if cpu is not None:
                self.own_last[pid] = cpu

    def kind_split_s(self, kinds: tuple[str, ...]) -> dict[str, float]:
        """Last own CPU per process summed by kind: ``kinds[depth]`` (deeper ones: the last name)."""
        out: dict[str, float] = {}
        own = dict(self.own_last)
        for root, total in self.final.items():  # a root that never had children: wait4 is exact
            if root not in self.parents and root in self.depth:
                own[root] = total
        for pid, cpu in own.items():
            name = kinds[min(self.depth[pid], len(kinds) - 1)] if kinds else "process"
            out[name] = out.get(name, 0.0) + cpu
        return out

    def window(self, start: float | None, end: float | None) -> tuple[dict[str, float], float] | None:
        """CPU ms per name between the first sample >= start and the last <= end, and that span in s."""
        if start is None or end is None:
            return None
        inside = [s for s in self.samples if start <= s[0] <= end]
        if len(inside) < 2 or inside[-1][0] - inside[0][0] < 2 * self.interval_s:
            return None
        (t0, a), (t1, b) = inside[0], inside[-1]
        return {k: round((b[k] - a.get(k, 0.0)) * 1000, 1) for k in b}, t1 - t0
