"""``python -m bench [--short]``: run scenarios 1, 2, 4 and 5, print tables, write bench/results/*.json.

Scenario 5 is issue 15's grid: dispatcher against its peers BullMQ + Nodemailer and Celery (installed
by the bench itself, :mod:`bench.peers`) at RTT x C = 0 ms x 1/4/16, 20 ms x 1/16, 100 ms x 16.

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

from bench.harness import DrainResult, EnqueueResult, Lab
from bench.report import (
    cpu_model,
    cpu_split_table,
    drain_table,
    enqueue_table,
    peer_cost_table,
    peer_table,
    targets_table,
    write_json,
)
from bench.scenarios import DISPATCHER_PLACEHOLDER, Scenario, all_scenarios, peer_scenarios


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


# Scaling runs send max(n_20ms, per_worker x workers): the dispatcher packs bulk-enqueued mails into jobs
# of up to 20, so each worker needs several jobs for the load to spread (60 = 3 jobs per worker).
# Scenario 5 (issue 15): N per cell sized so the slowest peer (Celery: smtplib's 4 round trips per mail)
# still drains in a few seconds; the dispatcher packs bulk-enqueued mails into jobs of up to 20, so at
# C = 16 N >= 320 gives each process at least one job.
SHORT_PEER_CELLS = ((0.0, 1, 300), (0.0, 4, 400), (0.0, 16, 480), (20.0, 1, 60), (20.0, 16, 320),
                    (100.0, 16, 320))
FULL_PEER_CELLS = ((0.0, 1, 1000), (0.0, 4, 1000), (0.0, 16, 1600), (20.0, 1, 200), (20.0, 16, 800),
                   (100.0, 16, 640))
SHORT = Plan("short", n_0ms=200, n_20ms=60, scaling_workers=(1, 2, 4, 8), scaling_per_worker=60,
             n_enqueue=2000, peer_cells=SHORT_PEER_CELLS, peer_rounds=1)
FULL = Plan("full", n_0ms=1000, n_20ms=200, scaling_workers=(1, 2, 4, 8, 16), scaling_per_worker=100,
            n_enqueue=10000, peer_cells=FULL_PEER_CELLS, peer_rounds=3)
RTTS_MS = (0.0, 20.0)
SCALING_RTT_MS = 20.0


def _say(text: str) -> None:
    print(text, flush=True)


def _progress(r: DrainResult) -> None:
    rate = f"{r.msgs_per_s:.1f} msg/s" if r.msgs_per_s else "no rate"
    _say(f"  {r.scenario:32s} rtt={r.rtt_ms:>4.0f}ms x{r.workers:<2d} {rate}{'' if r.ok else '  (PROBLEM)'}")


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


def scenario_5(lab: Lab, plan: Plan, scenarios: list[Scenario]) -> list[DrainResult]:
    """Issue 15's grid. Per cell the contenders run back to back (round-robin over rounds), so the
    machine's noise hits them alike and the ratios are same-run ratios."""
    peers = [s for s in scenarios if s.peer]
    results = []
    for rtt, workers, n in plan.peer_cells:
        for round_no in range(1, plan.peer_rounds + 1):
            for sc in peers:
                r = replace(lab.drain(sc, rtt, workers=workers, messages=n), round=round_no)
                results.append(r)
                _progress(r)
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
    if args.peer_cells:
        cells = [c.split(":") for c in args.peer_cells.split(",")]
        plan = replace(plan, peer_cells=tuple((float(r), int(c), int(n)) for r, c, n in cells))
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
            _say("\n== scenario 5: peers of issue 15 (RTT x C; BullMQ + Nodemailer, Celery) ==")
            s5 = scenario_5(lab, plan, scenarios)
            doc["scenarios"]["peers"] = [r.as_dict() for r in s5]
            _say("\n" + peer_table(s5) + "\n\n" + peer_cost_table(s5))
            for note in peer_notes:
                if note.startswith(("SKIPPED", "PROBLEM")):
                    _say(f"\n{note}")

    doc["meta"]["duration_s"] = round(time.monotonic() - started, 1)
    doc["meta"]["loadavg_end"] = os.getloadavg()
    _say("\n" + targets_table(doc))
    dated, latest = write_json(doc, stamp)
    _say(f"\nwrote {dated} and {latest} ({doc['meta']['duration_s']} s)")
    if not args.no_plot:
        from bench.plot import plot

        _say(f"wrote {plot(latest)}")
    all_ok = all(r["ok"] for key in ("throughput", "scaling", "peers") for r in doc["scenarios"].get(key, []))
    all_ok = all_ok and not any(note.startswith("PROBLEM") for note in peer_notes)
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
