"""``python -m bench [--short]``: run scenarios 1, 2, 4 and 5, print tables, write bench/results/*.json.

Scenario 5 is issue 15's grid: RTT 0/20/100 ms x C = 1/4/16 x dispatcher (C processes; and 1 process x C
connections where worker.py has ``--connections``), BullMQ + Nodemailer, Celery (both installed by the
bench itself, :mod:`bench.peers`) and baseline (b) with C rq processes; then one untimed MONITOR pass per
contender and C counts Redis commands per mail (:mod:`bench.commands`).

Scenario 3 of issue 7 (worker CPU ms per message, peak RSS per worker process) is not a separate run:
every drain of scenarios 1 and 2 measures it (``cpu ms/msg``, ``net cpu``, ``rss MB`` columns).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from typing import Any

from bench.commands import CommandResult
from bench.grid_report import commands_table, grid_cost_table, grid_table
from bench.harness import DrainResult, EnqueueResult, Lab
from bench.peers.contenders import PEER_ORDER, peer_scenarios
from bench.report import (
    COMMANDS_TITLE,
    COST_TITLE,
    GRID_TITLE,
    cpu_model,
    cpu_split_table,
    drain_table,
    enqueue_table,
    targets_table,
    write_json,
)
from bench.scenarios import DISPATCHER_PLACEHOLDER, Scenario, all_scenarios


@dataclass(frozen=True)
class Plan:
    mode: str
    n_0ms: int  # messages per throughput run at 0 ms RTT
    n_20ms: int  # ... at 20 ms RTT
    scaling_workers: tuple[int, ...]
    scaling_per_worker: int  # scaling runs send max(n_20ms, per_worker x workers) messages
    n_enqueue: int
    peer_cells: tuple[tuple[float, int, int], ...] = ()  # scenario 5: (rtt ms, C, messages)
    peer_rounds: int = 1  # scenario 5: rounds per cell (the tables show the median)
    count_commands: bool = True  # scenario 5: one untimed MONITOR pass per contender and C (at 0 ms)
    command_n: tuple[tuple[int, int], ...] = ()  # (C, N) of those passes; a C not listed: its first cell's N

    def command_cells(self) -> list[tuple[int, int]]:
        """(C, N) of the MONITOR passes: every C of the grid once."""
        sizes = dict(self.command_n)
        first: dict[int, int] = {}
        for _, workers, n in self.peer_cells:
            first.setdefault(workers, sizes.get(workers, n))
        return list(first.items())


# Scaling runs send max(n_20ms, per_worker x workers): the dispatcher packs bulk-enqueued mails into jobs
# of up to 20, so each worker needs several jobs for the load to spread (60 = 3 jobs per worker).
# Scenario 5 (issue 15): N per cell so the fastest contender's drain lasts >= ~1.5 s (start-up included)
# at the rates of the table; N is a multiple of 20 x C at C = 4 and 16 (the dispatcher's jobs of up
# to 20 mails then spread evenly: 320 at C = 16 is one job per process). The slow contenders (Celery and
# rq: smtplib's 4 round trips per mail) make the 100 ms cells the long ones (~8 s each for them).
SHORT_PEER_CELLS = ((0.0, 1, 600), (0.0, 4, 800), (0.0, 16, 960),
                    (20.0, 1, 60), (20.0, 4, 160), (20.0, 16, 320),
                    (100.0, 1, 16), (100.0, 4, 80), (100.0, 16, 320))
FULL_PEER_CELLS = ((0.0, 1, 1500), (0.0, 4, 1600), (0.0, 16, 1920),
                   (20.0, 1, 150), (20.0, 4, 320), (20.0, 16, 640),
                   (100.0, 1, 30), (100.0, 4, 160), (100.0, 16, 640))
# The MONITOR passes (Redis commands per mail) count every command, start-up and exit included: N large
# enough that per-process registration is a small share (16 processes x ~40 commands / 640 = 1 per mail).
SHORT = Plan("short", n_0ms=200, n_20ms=60, scaling_workers=(1, 2, 4, 8), scaling_per_worker=60,
             n_enqueue=2000, peer_cells=SHORT_PEER_CELLS, peer_rounds=1,
             command_n=((1, 300), (4, 320), (16, 640)))
FULL = Plan("full", n_0ms=1000, n_20ms=200, scaling_workers=(1, 2, 4, 8, 16), scaling_per_worker=100,
            n_enqueue=10000, peer_cells=FULL_PEER_CELLS, peer_rounds=3,
            command_n=((1, 1000), (4, 1000), (16, 1280)))
RTTS_MS = (0.0, 20.0)
SCALING_RTT_MS = 20.0


def _say(text: str) -> None:
    print(text, flush=True)


def _progress(r: DrainResult) -> None:
    rate = f"{r.msgs_per_s:.1f} msg/s" if r.msgs_per_s else "no rate"
    _say(f"  {r.scenario:40s} rtt={r.rtt_ms:>4.0f}ms x{r.workers:<2d} {rate}{'' if r.ok else '  (PROBLEM)'}")


def scenario_1(lab: Lab, plan: Plan, scenarios: list[Scenario]) -> list[DrainResult]:
    results = []
    for rtt in RTTS_MS:
        for sc in (s for s in scenarios if s.throughput):
            results.append(lab.drain(sc, rtt, workers=1, messages=plan.n_0ms if rtt == 0 else plan.n_20ms))
            _progress(results[-1])
    return results


def scenario_2(lab: Lab, plan: Plan, scenarios: list[Scenario]) -> list[DrainResult]:
    results = []
    for sc in (s for s in scenarios if s.scaling):
        for workers in plan.scaling_workers:
            n = max(plan.n_20ms, plan.scaling_per_worker * workers)
            results.append(lab.drain(sc, SCALING_RTT_MS, workers=workers, messages=n))
            _progress(results[-1])
    return results


def scenario_4(lab: Lab, plan: Plan, scenarios: list[Scenario]) -> list[EnqueueResult]:
    cases = [case for sc in scenarios for case in sc.enqueue_cases]
    if not any(case.name == DISPATCHER_PLACEHOLDER.name for case in cases):
        cases.append(DISPATCHER_PLACEHOLDER)
    return [lab.enqueue_rate(case, plan.n_enqueue) for case in cases]


def grid_contenders(scenarios: list[Scenario]) -> list[Scenario]:
    """Scenario 5's contenders in PEER_ORDER (any other peer after them)."""
    rank = {name: i for i, name in enumerate(PEER_ORDER)}
    return sorted((s for s in scenarios if s.peer), key=lambda s: rank.get(s.name, len(rank)))


def scenario_5(lab: Lab, plan: Plan, scenarios: list[Scenario]) -> list[DrainResult]:
    """Issue 15's grid. Per cell the contenders run back to back (round-robin over rounds), so the
    machine's noise hits them alike and the ratios are same-run ratios."""
    results = []
    for rtt, workers, n in plan.peer_cells:
        for round_no in range(1, plan.peer_rounds + 1):
            for sc in grid_contenders(scenarios):
                if (sc.skip_c1 and workers == 1) or workers <= sc.skip_upto:
                    continue
                r = replace(lab.drain(sc, rtt, workers=workers, messages=n), round=round_no)
                results.append(r)
                _progress(r)
    return results


def scenario_5_commands(lab: Lab, plan: Plan, scenarios: list[Scenario]) -> list[CommandResult]:
    """Redis commands per mail: one untimed drain under MONITOR per contender and C (0 ms RTT)."""
    results = []
    for workers, n in plan.command_cells():
        for sc in grid_contenders(scenarios):
            if (sc.skip_c1 and workers == 1) or workers <= sc.skip_upto:
                continue
            c = lab.count_commands(sc, workers, n)
            results.append(c)
            total = f"{c.total_per_mail:.1f}" if c.total_per_mail is not None else "-"
            _say(f"  {sc.name:40s} x{workers:<2d} {total} commands/mail ({c.client} client + {c.lua} lua)"
                 + ("" if c.ok else f"  (PROBLEM: {c.error[:200]})"))
    return results


def _meta(plan: Plan, lab: Lab) -> dict[str, Any]:
    redis_version = subprocess.run([lab.redis.binary, "--version"], capture_output=True, text=True).stdout
    return {
        "mode": plan.mode,
        "plan": asdict(plan),
        "python": platform.python_version(),
        "rq": version("rq"),
        "redis_py": version("redis"),
        "redis_server": redis_version.strip(),
        "aiosmtpd": version("aiosmtpd"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "loadavg_start": os.getloadavg(),
        "platform": platform.platform(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--short", action="store_true", help="smaller N, scaling 1..8 (~1-3 minutes)")
    parser.add_argument("--only", action="append", default=[],
                        help="run only scenarios whose name contains this (repeatable)")
    parser.add_argument("--skip", action="append", default=[], choices=["1", "2", "4", "5"],
                        help="skip a scenario number (repeatable)")
    parser.add_argument("--peer-rounds", type=int, default=None, metavar="R",
                        help="scenario 5: rounds per cell (short: 1, full: 3; tables show the median)")
    parser.add_argument("--peer-cells", default=None, metavar="RTT:C:N,...",
                        help="scenario 5: these cells instead of the plan's, e.g. 0:1:300,100:16:320")
    parser.add_argument("--no-commands", action="store_true",
                        help="scenario 5: skip the untimed MONITOR passes (Redis commands per mail)")
    parser.add_argument("--scaling", type=lambda v: tuple(int(x) for x in v.split(",")), default=None,
                        metavar="1,2,4,...", help="scenario 2: these worker counts instead of the plan's")
    parser.add_argument("--timeout", type=float, default=120.0, help="max seconds per drain")
    parser.add_argument("--no-plot", action="store_true", help="do not write results/throughput.png")
    args = parser.parse_args(argv)

    plan = SHORT if args.short else FULL
    if args.scaling:
        plan = replace(plan, scaling_workers=args.scaling)
    if args.peer_rounds:
        plan = replace(plan, peer_rounds=args.peer_rounds)
    if args.no_commands:
        plan = replace(plan, count_commands=False)
    if args.peer_cells:
        cells = [c.split(":") for c in args.peer_cells.split(",")]
        plan = replace(plan, peer_cells=tuple((float(r), int(c), int(n)) for r, c, n in cells), command_n=())
    candidates = all_scenarios()
    peer_notes: list[str] = []
    if "5" not in args.skip:
        peers, peer_notes = peer_scenarios()  # installs BullMQ + Nodemailer on first use (npm ci)
        candidates += peers
    scenarios = [s for s in candidates if not args.only or any(o in s.name for o in args.only)]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    started = time.monotonic()
    doc: dict[str, Any] = {"timestamp": stamp, "scenarios": {}}

    with Lab(timeout_s=args.timeout) as lab:
        doc["meta"] = _meta(plan, lab)
        doc["meta"]["peers"] = peer_notes
        for note in peer_notes:
            _say(f"peers: {note}")
        probe_rtts = sorted({*RTTS_MS, *(c[0] for c in plan.peer_cells)}) if "5" not in args.skip else RTTS_MS
        doc["meta"]["effective_rtt_ms"] = {f"{rtt:.0f}": round(lab.probe_rtt_ms(rtt), 2)
                                           for rtt in probe_rtts}
        sinks = ", ".join(f"{name} 127.0.0.1:{sink.port}" for name, sink in lab.sinks.items())
        probe = ", ".join(f"{k} ms -> {v:.2f} ms" for k, v in doc["meta"]["effective_rtt_ms"].items())
        _say(f"effective RTT through the delay proxy (NOOP ping-pong, median): {probe}")
        _say(f"bench {plan.mode}: redis {lab.redis.url}, sinks {sinks}, "
             f"scenarios: {', '.join(s.name for s in scenarios)}")
        if "1" not in args.skip:
            _say("\n== scenario 1: end-to-end throughput, one unit of concurrency ==")
            s1 = scenario_1(lab, plan, scenarios)
            doc["scenarios"]["throughput"] = [r.as_dict() for r in s1]
            _say("\n" + drain_table(s1, ratio_to="reference"))
        if "2" not in args.skip:
            _say(f"\n== scenario 2: scaling at {SCALING_RTT_MS:.0f} ms RTT ==")
            s2 = scenario_2(lab, plan, scenarios)
            doc["scenarios"]["scaling"] = [r.as_dict() for r in s2]
            _say("\n" + drain_table(s2, ratio_to="one_worker"))
            _say(f"\nwho uses the CPU ({os.cpu_count()} cores; busy = CPU s / wall s over the whole drain "
                 "and over the steady window first..last mail; ms columns = steady window):\n"
                 + cpu_split_table(s2))
        if "4" not in args.skip:
            _say("\n== scenario 4: enqueue rate (producer side, no delay) ==")
            s4 = scenario_4(lab, plan, scenarios)
            doc["scenarios"]["enqueue"] = [r.as_dict() for r in s4]
            _say(enqueue_table(s4))
        if "5" not in args.skip:
            _say("\n== scenario 5: issue 15's grid (RTT x C x dispatcher, BullMQ, Celery, rq (b)) ==")
            s5 = scenario_5(lab, plan, scenarios)
            doc["scenarios"]["peers"] = [r.as_dict() for r in s5]
            commands: list[CommandResult] = []
            if plan.count_commands:
                _say("\n== scenario 5: Redis commands per mail (untimed MONITOR pass per contender and C, "
                     "0 ms RTT) ==")
                commands = scenario_5_commands(lab, plan, scenarios)
                doc["scenarios"]["commands"] = [c.as_dict() for c in commands]
            _say(f"\n{GRID_TITLE}:\n{grid_table(s5)}\n\n{COST_TITLE}:\n{grid_cost_table(s5, commands)}")
            if commands:
                _say(f"\n{COMMANDS_TITLE}:\n{commands_table(commands)}")
            for note in peer_notes:
                if note.startswith(("SKIPPED", "PROBLEM")):
                    _say(f"\n{note}")

    doc["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    doc["meta"]["loadavg_end"] = os.getloadavg()
    _say("\n" + targets_table(doc))
    dated, latest = write_json(doc, stamp)
    _say(f"\nwrote {dated} and {latest} ({doc['meta']['duration_s']} s)")
    if not args.no_plot:
        from bench.plot import plot, plot_grid

        _say(f"wrote {plot(latest)}")
        if doc["scenarios"].get("peers"):
            _say(f"wrote {plot_grid(latest)}")
    all_ok = all(r["ok"] for key in ("throughput", "scaling", "peers", "commands")
                 for r in doc["scenarios"].get(key, []))
    all_ok = all_ok and not any(note.startswith("PROBLEM") for note in peer_notes)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
