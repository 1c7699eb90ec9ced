"""Tables for the terminal, the README (markdown) and the JSON results file.

``python -m bench.report [--markdown] [results.json]`` prints the tables of a results file (default
``bench/results/latest.json``); ``--markdown`` adds the machine it ran on and the targets of issue 7, ready
to paste into the README.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from bench.commands import CommandResult
from bench.grid_report import commands_table, grid_cost_table, grid_table
from bench.harness import DrainResult, EnqueueResult
from bench.scenarios import base_name
from bench.tables import fmt, ratio, table
from bench.targets import checks, issue15_checks

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE = "rq-SimpleWorker+smtplib-kept"
SPLIT_KEYS = ("workers", "sink", "redis", "proxy", "harness")


def _reference(r: DrainResult, results: Sequence[DrainResult], ratio_to: str) -> DrainResult | None:
    """(b) on the same sink at the same RTT (else (b) on the aiosmtpd sink), or the same contender x1."""
    if ratio_to == "one_worker":
        return next((x for x in results if x.scenario == r.scenario and x.rtt_ms == r.rtt_ms
                     and x.workers == 1), None)
    candidates = [x for x in results if base_name(x.scenario) == REFERENCE and x.rtt_ms == r.rtt_ms
                  and x.workers == r.workers]
    return next((x for x in candidates if x.sink == r.sink), candidates[0] if candidates else None)


def drain_table(results: Sequence[DrainResult], ratio_to: str, markdown: bool = False) -> str:
    """ratio_to: "reference" (vs baseline (b), same sink, RTT and workers) or "one_worker"."""
    steady_col = ratio_to == "one_worker"
    headers = ["scenario", "rtt ms", "workers", "msgs", "msg/s", "steady", "ratio",
               *(["steady ratio"] if steady_col else []), "cpu ms/msg", "net cpu", "rss MB", "conns", "ok"]
    rows = []
    for r in results:
        ref = _reference(r, results, ratio_to)
        rate_ratio = ratio(r.msgs_per_s, ref.msgs_per_s if ref else None)
        steady = ratio(r.steady_msgs_per_s, ref.steady_msgs_per_s if ref else None)
        rows.append([r.scenario, fmt(r.rtt_ms, ".0f"), str(r.workers), f"{r.delivered}/{r.messages}",
                     fmt(r.msgs_per_s), fmt(r.steady_msgs_per_s), fmt(rate_ratio, ".2f") + "x",
                     *([fmt(steady, ".2f") + "x"] if steady_col else []),
                     fmt(r.cpu_ms_per_msg, ".2f"), fmt(r.cpu_ms_per_msg_net, ".2f"), fmt(r.peak_rss_mb),
                     str(r.connections), "yes" if r.ok else "NO"])
    text = table(headers, rows, markdown)
    problems = [f"  {r.scenario} @ {r.rtt_ms:.0f} ms x{r.workers}: {r.error}" for r in results if not r.ok]
    return text + ("\n\nproblems:\n" + "\n".join(problems) if problems else "")


def cpu_split_table(results: Sequence[DrainResult], markdown: bool = False) -> str:
    """Who used the CPU: whole drain (start-up included) and the steady window (first..last mail)."""
    headers = ["scenario", "workers", "drain s", "busy cores", "steady s", "steady busy",
               *(f"{k} ms" for k in SPLIT_KEYS), "workers %"]
    rows = []
    for r in results:
        split = r.steady_cpu_split_ms
        total = sum(split.values())
        rows.append([r.scenario, str(r.workers), fmt(r.workers_exit_s, ".2f"), fmt(r.busy_cores, ".2f"),
                     fmt(r.steady_window_s, ".2f"), fmt(r.steady_busy_cores, ".2f"),
                     *(fmt(split.get(k), ".0f") for k in SPLIT_KEYS),
                     fmt(100 * split.get("workers", 0) / total if total else None, ".0f")])
    return table(headers, rows, markdown)


def enqueue_table(results: Sequence[EnqueueResult], markdown: bool = False) -> str:
    headers = ["case", "jobs", "seconds", "jobs/s", "note"]
    rows = [[r.case, str(r.n), fmt(r.seconds, ".3f"), fmt(r.jobs_per_s, ".0f"), r.note] for r in results]
    return table(headers, rows, markdown)


GRID_TITLE = ("Scenario 5: issue 15's grid (drain msg/s, median over rounds; ratio = ours / peer; "
              "N = mails per drain)")
COST_TITLE = ("Scenario 5: per contender and cell: worker CPU ms per mail (net = minus start-up; by "
              "process kind), summed PSS, Redis commands per mail (MONITOR pass at 0 ms, same C)")
COMMANDS_TITLE = ("Scenario 5: Redis commands per delivered mail (untimed MONITOR pass at 0 ms RTT; "
                  "client = sent by the workers, lua = run inside their scripts)")


def targets_table(doc: dict[str, Any], markdown: bool = False) -> str:
    mark = {True: "met", False: "MISSED", None: "n/a"}
    ran = doc.get("scenarios", {})
    parts = []
    if any(key in ran for key in ("throughput", "scaling", "enqueue")):
        parts.append(table(["target (issue 7)", "measured", ""],
                           [[c.target, c.measured, mark[c.met]] for c in checks(doc)], markdown))
    if "peers" in ran or "enqueue" in ran:
        parts.append(table(["target (issue 15)", "measured", ""],
                           [[c.target, c.measured, mark[c.met]] for c in issue15_checks(doc)], markdown))
    return "\n\n".join(parts)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def write_json(doc: dict[str, Any], stamp: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    dated = RESULTS_DIR / f"{stamp}.json"
    latest = RESULTS_DIR / "latest.json"
    dated.write_text(text)
    latest.write_text(text)
    return dated, latest


# --- reading a results file back ------------------------------------------------------------------


def _drains(rows: list[dict[str, Any]]) -> list[DrainResult]:
    """DrainResults from JSON; files from older harness versions lack some fields (defaults fill in)."""
    names = {f.name for f in fields(DrainResult)}
    return [DrainResult(**{"sink": "aiosmtpd", **{k: v for k, v in r.items() if k in names}}) for r in rows]


def _commands(rows: list[dict[str, Any]]) -> list[CommandResult]:
    names = {f.name for f in fields(CommandResult)}
    return [CommandResult(**{k: v for k, v in r.items() if k in names}) for r in rows]


def _enqueues(rows: list[dict[str, Any]]) -> list[EnqueueResult]:
    names = {f.name for f in fields(EnqueueResult)}
    return [EnqueueResult(**{k: v for k, v in r.items() if k in names}) for r in rows]


def machine(meta: dict[str, Any]) -> str:
    load = meta.get("loadavg_start")
    rtts = ", ".join(f"{k} ms nominal = {v:.2f} ms" for k, v in meta.get("effective_rtt_ms", {}).items())
    return (f"{meta.get('cpu_model') or cpu_model()}, {meta.get('cpu_count', os.cpu_count())} cores; "
            f"{meta.get('platform', platform.platform())}; Python {meta.get('python', '?')}, "
            f"rq {meta.get('rq', '?')}, redis-py {meta.get('redis_py', '?')}, "
            f"{meta.get('redis_server', 'redis-server ?').split(' sha=')[0]}, "
            f"aiosmtpd {meta.get('aiosmtpd', '?')}"
            + (f"; load average at start {load[0]:.2f}" if load else "")
            + (f"; effective RTT through the proxy: {rtts}" if rtts else ""))


def render(doc: dict[str, Any], markdown: bool) -> str:
    meta = doc.get("meta", {})
    sc = doc.get("scenarios", {})
    h = "### " if markdown else "== "
    parts = []
    if markdown:
        parts.append(f"Bench run `{doc.get('timestamp', '?')}` ({meta.get('mode', '?')} mode, "
                     f"{meta.get('duration_s', '?')} s): `.venv/bin/python -m bench"
                     f"{' --short' if meta.get('mode') == 'short' else ''}`\n\nMachine: {machine(meta)}")
    else:
        parts.append(f"run {doc.get('timestamp', '?')} ({meta.get('mode', '?')}) on {machine(meta)}")
    if "throughput" in sc:
        text = drain_table(_drains(sc["throughput"]), "reference", markdown)
        parts.append(f"{h}Scenario 1: end-to-end throughput, one unit of concurrency "
                     f"(ratio vs (b), same sink)\n\n{text}")
    if "scaling" in sc:
        drains = _drains(sc["scaling"])
        parts.append(f"{h}Scenario 2: scaling at 20 ms RTT (ratio vs the same contender x1)\n\n"
                     f"{drain_table(drains, 'one_worker', markdown)}")
        parts.append(f"{h}Scenario 2: who uses the CPU ({meta.get('cpu_count', '?')} cores; "
                     "busy = CPU s / wall s; ms columns = steady window)\n\n"
                     f"{cpu_split_table(drains, markdown)}")
    if "enqueue" in sc:
        parts.append(f"{h}Scenario 4: enqueue rate (producer side, no delay)\n\n"
                     f"{enqueue_table(_enqueues(sc['enqueue']), markdown)}")
    if "peers" in sc:
        drains = _drains(sc["peers"])
        commands = _commands(sc.get("commands", []))
        notes = "; ".join(meta.get("peers", []))
        parts.append(f"{h}{GRID_TITLE}\n\n{grid_table(drains, markdown)}" + (f"\n\n{notes}" if notes else ""))
        parts.append(f"{h}{COST_TITLE}\n\n{grid_cost_table(drains, commands, markdown)}")
        if commands:
            parts.append(f"{h}{COMMANDS_TITLE}\n\n{commands_table(commands, markdown)}")
    parts.append(f"{h}Targets\n\n{targets_table(doc, markdown)}")
    if markdown:
        parts.append("Columns: `msg/s` = delivered / (last mail at sink - worker spawn), start-up included; "
                     "`steady` = rate once mail flows; `net cpu` = worker CPU ms per message minus start-up; "
                     "`rss MB` = peak RSS of any worker process. Plot: `bench/results/throughput.png`.")
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    parser.add_argument("results", nargs="?", type=Path, default=RESULTS_DIR / "latest.json")
    parser.add_argument("--markdown", action="store_true", help="markdown tables + machine + targets")
    args = parser.parse_args(argv)
    print(render(json.loads(args.results.read_text()), args.markdown))


if __name__ == "__main__":
    main()
