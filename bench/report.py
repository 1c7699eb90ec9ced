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

from bench.harness import DrainResult, EnqueueResult
from bench.scenarios import BULLMQ, CELERY, base_name
from bench.targets import checks

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE = "rq-SimpleWorker+smtplib-kept"
SPLIT_KEYS = ("workers", "sink", "redis", "proxy", "harness")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """First column left-aligned (names), the rest right-aligned (numbers)."""
    pairs = enumerate(zip(cells, widths, strict=True))
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    if markdown:
        rule = "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"
        lines = ["| " + " | ".join(headers) + " |", rule]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = _row(headers, widths)
    return "\n".join([line, "-" * len(line), *(_row(r, widths) for r in rows)])


def _reference(r: DrainResult, results: Sequence[DrainResult], ratio_to: str) -> DrainResult | None:
    """(b) on the same sink at the same RTT (else (b) on the aiosmtpd sink), or the same contender x1."""
    if ratio_to == "one_worker":
        return next((x for x in results if x.scenario == r.scenario and x.rtt_ms == r.rtt_ms
                     and x.workers == 1), None)
    candidates = [x for x in results if base_name(x.scenario) == REFERENCE and x.rtt_ms == r.rtt_ms
                  and x.workers == r.workers]
    return next((x for x in candidates if x.sink == r.sink), candidates[0] if candidates else None)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def drain_table(results: Sequence[DrainResult], ratio_to: str, markdown: bool = False) -> str:
    """ratio_to: "reference" (vs baseline (b), same sink, RTT and workers) or "one_worker"."""
    steady_col = ratio_to == "one_worker"
    headers = ["scenario", "rtt ms", "workers", "msgs", "msg/s", "steady", "ratio",
               *(["steady ratio"] if steady_col else []), "cpu ms/msg", "net cpu", "rss MB", "conns", "ok"]
    rows = []
    for r in results:
        ref = _reference(r, results, ratio_to)
        ratio = _ratio(r.msgs_per_s, ref.msgs_per_s if ref else None)
        steady = _ratio(r.steady_msgs_per_s, ref.steady_msgs_per_s if ref else None)
        rows.append([r.scenario, _fmt(r.rtt_ms, ".0f"), str(r.workers), f"{r.delivered}/{r.messages}",
                     _fmt(r.msgs_per_s), _fmt(r.steady_msgs_per_s), _fmt(ratio, ".2f") + "x",
                     *([_fmt(steady, ".2f") + "x"] if steady_col else []),
                     _fmt(r.cpu_ms_per_msg, ".2f"), _fmt(r.cpu_ms_per_msg_net, ".2f"), _fmt(r.peak_rss_mb),
                     str(r.connections), "yes" if r.ok else "NO"])
    text = _table(headers, rows, markdown)
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
        rows.append([r.scenario, str(r.workers), _fmt(r.workers_exit_s, ".2f"), _fmt(r.busy_cores, ".2f"),
                     _fmt(r.steady_window_s, ".2f"), _fmt(r.steady_busy_cores, ".2f"),
                     *(_fmt(split.get(k), ".0f") for k in SPLIT_KEYS),
                     _fmt(100 * split.get("workers", 0) / total if total else None, ".0f")])
    return _table(headers, rows, markdown)


# --- scenario 5: peers of issue 15 ---------------------------------------------------------------------

OURS = "dispatcher"
PEER_ORDER = (OURS, BULLMQ, CELERY)


def _median(values: Sequence[float | None]) -> float | None:
    have = sorted(v for v in values if v is not None)
    if not have:
        return None
    mid = len(have) // 2
    return have[mid] if len(have) % 2 else (have[mid - 1] + have[mid]) / 2


def _cells(results: Sequence[DrainResult]) -> list[tuple[float, int]]:
    return list(dict.fromkeys((r.rtt_ms, r.workers) for r in results))


def _runs(results: Sequence[DrainResult], name: str, cell: tuple[float, int]) -> list[DrainResult]:
    return [r for r in results if r.scenario == name and (r.rtt_ms, r.workers) == cell]


def _med(runs: Sequence[DrainResult], key: str) -> float | None:
    return _median([getattr(r, key) for r in runs])


def _per_round(ours: Sequence[DrainResult], peer: Sequence[DrainResult]) -> str:
    by_round = {r.round: r.msgs_per_s for r in peer}
    ratios = [_ratio(r.msgs_per_s, by_round.get(r.round)) for r in ours]
    return " / ".join(_fmt(x, ".2f") for x in ratios)


def _rate_cell(value: float | None, runs: Sequence[DrainResult]) -> str:
    """Median msg/s of a contender's runs in one cell; "(!)" when a run had a problem; "-" if not run."""
    return ("-" if not runs else _fmt(value)) + (" (!)" if any(not r.ok for r in runs) else "")


def peer_table(results: Sequence[DrainResult], markdown: bool = False) -> str:
    """Issue 15's table: drain msg/s per RTT x C (median over rounds), ours / peer ratios."""
    rounds = max((r.round for r in results), default=1)
    headers = ["RTT ms", "C", f"{OURS} msg/s", f"{BULLMQ} msg/s", "ratio", "steady ratio", f"{CELERY} msg/s",
               "ratio vs Celery", *(["ratio per round (vs BullMQ)"] if rounds > 1 else [])]
    rows = []
    for cell in _cells(results):
        ours, bull, cel = (_runs(results, name, cell) for name in PEER_ORDER)
        o, b, c = (_med(x, "msgs_per_s") for x in (ours, bull, cel))
        steady = _ratio(_med(ours, "steady_msgs_per_s"), _med(bull, "steady_msgs_per_s"))
        rows.append([_fmt(cell[0], ".0f"), str(cell[1]), _rate_cell(o, ours), _rate_cell(b, bull),
                     _fmt(_ratio(o, b), ".2f") + "x", _fmt(steady, ".2f") + "x", _rate_cell(c, cel),
                     _fmt(_ratio(o, c), ".2f") + "x", *([_per_round(ours, bull)] if rounds > 1 else [])])
    text = _table(headers, rows, markdown)
    problems = [f"  {r.scenario} @ {r.rtt_ms:.0f} ms x{r.workers} round {r.round}: {r.error}"
                for r in results if not r.ok]
    return text + ("\n\nproblems ((!) above):\n" + "\n".join(problems) if problems else "")


def peer_cost_table(results: Sequence[DrainResult], markdown: bool = False) -> str:
    """Per contender and cell (median over rounds): worker CPU per mail, memory, processes, connections.

    Memory is the peak of the summed PSS of all worker processes (sampled every ~100 ms), not ``rss MB``:
    a child's ``ru_maxrss`` starts at the RSS of the harness that forked it.
    """
    headers = ["RTT ms", "C", "contender", "msg/s", "steady", "cpu ms/msg", "net cpu", "procs", "pss MB sum",
               "conns"]
    rows = []
    for cell in _cells(results):
        for name in PEER_ORDER:
            runs = _runs(results, name, cell)
            if not runs:
                continue
            procs = _median([r.peak_procs for r in runs])
            rows.append([_fmt(cell[0], ".0f"), str(cell[1]), name, _fmt(_med(runs, "msgs_per_s")),
                         _fmt(_med(runs, "steady_msgs_per_s")), _fmt(_med(runs, "cpu_ms_per_msg"), ".2f"),
                         _fmt(_med(runs, "cpu_ms_per_msg_net"), ".2f"), _fmt(procs, ".0f"),
                         _fmt(_med(runs, "peak_pss_mb")),
                         str(int(_median([r.connections for r in runs]) or 0))])
    return _table(headers, rows, markdown)


def enqueue_table(results: Sequence[EnqueueResult], markdown: bool = False) -> str:
    headers = ["case", "jobs", "seconds", "jobs/s", "note"]
    rows = [[r.case, str(r.n), _fmt(r.seconds, ".3f"), _fmt(r.jobs_per_s, ".0f"), r.note] for r in results]
    return _table(headers, rows, markdown)


def targets_table(doc: dict[str, Any], markdown: bool = False) -> str:
    mark = {True: "met", False: "MISSED", None: "n/a"}
    return _table(["target (issue 7)", "measured", ""],
                  [[c.target, c.measured, mark[c.met]] for c in checks(doc)], markdown)


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
        table = drain_table(_drains(sc["throughput"]), "reference", markdown)
        parts.append(f"{h}Scenario 1: end-to-end throughput, one unit of concurrency "
                     f"(ratio vs (b), same sink)\n\n{table}")
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
        notes = "; ".join(meta.get("peers", []))
        parts.append(f"{h}Scenario 5: peers of issue 15 (drain msg/s, median over rounds; "
                     f"ratio = dispatcher / peer)\n\n{peer_table(drains, markdown)}"
                     + (f"\n\n{notes}" if notes else ""))
        parts.append(f"{h}Scenario 5: worker CPU and memory per contender\n\n"
                     f"{peer_cost_table(drains, markdown)}")
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
