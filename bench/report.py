"""Plain-text tables for the terminal and the JSON results file."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.harness import DrainResult, EnqueueResult

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REFERENCE = "rq-SimpleWorker+smtplib-kept"


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    """First column left-aligned (names), the rest right-aligned (numbers)."""
    pairs = enumerate(zip(cells, widths, strict=True))
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = _row(headers, widths)
    return "\n".join([line, "-" * len(line), *(_row(r, widths) for r in rows)])


def drain_table(results: Sequence[DrainResult], ratio_to: str) -> str:
    """ratio_to: "reference" (vs baseline (b) at the same RTT and workers) or "one_worker"."""
    headers = ["scenario", "rtt ms", "workers", "msgs", "msg/s", "steady", "ratio", "cpu ms/msg",
               "net cpu", "rss MB", "conns", "ok"]
    rows = []
    for r in results:
        if ratio_to == "reference":
            ref = next((x for x in results if x.scenario == REFERENCE and x.rtt_ms == r.rtt_ms
                        and x.workers == r.workers), None)
        else:
            ref = next((x for x in results if x.scenario == r.scenario and x.rtt_ms == r.rtt_ms
                        and x.workers == 1), None)
        ratio = r.msgs_per_s / ref.msgs_per_s if ref and ref.msgs_per_s and r.msgs_per_s else None
        rows.append([r.scenario, _fmt(r.rtt_ms, ".0f"), str(r.workers), f"{r.delivered}/{r.messages}",
                     _fmt(r.msgs_per_s), _fmt(r.steady_msgs_per_s), _fmt(ratio, ".2f") + "x",
                     _fmt(r.cpu_ms_per_msg, ".2f"), _fmt(r.cpu_ms_per_msg_net, ".2f"), _fmt(r.peak_rss_mb),
                     str(r.connections), "yes" if r.ok else "NO"])
    text = _table(headers, rows)
    problems = [f"  {r.scenario} @ {r.rtt_ms:.0f} ms x{r.workers}: {r.error}" for r in results if not r.ok]
    return text + ("\nproblems:\n" + "\n".join(problems) if problems else "")


def enqueue_table(results: Sequence[EnqueueResult]) -> str:
    headers = ["case", "jobs", "seconds", "jobs/s", "note"]
    rows = [[r.case, str(r.n), _fmt(r.seconds, ".3f"), _fmt(r.jobs_per_s, ".0f"), r.note] for r in results]
    return _table(headers, rows)


def write_json(doc: dict[str, Any], stamp: str) -> tuple[Path, Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2, sort_keys=False) + "\n"
    dated = RESULTS_DIR / f"{stamp}.json"
    latest = RESULTS_DIR / "latest.json"
    dated.write_text(text)
    latest.write_text(text)
    return dated, latest
