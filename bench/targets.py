"""The targets of issue 7 (and issue 8's "throttling costs nothing while the limit is not reached"),
checked against one results document (ratios from the same run).

Each check names the rows it used, so a reader can find them in the tables; a missing row (scenario
skipped, contender unavailable) gives ``met=None`` rather than a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

OURS = "dispatcher"
OURS_CHUNKING = "dispatcher (CHUNKING sink)"
OURS_RATE = "dispatcher (rate limit not reached)"
BASE_A = "rq-Worker+smtplib-new"
BASE_B = "rq-SimpleWorker+smtplib-kept"
BULK = ("dispatcher.enqueue_many", "dispatcher.Producer.enqueue_many")


@dataclass(frozen=True)
class Check:
    target: str
    measured: str
    met: bool | None


Row = dict[str, Any]


def _find(rows: list[Row], scenario: str, rtt: float, workers: int = 1) -> Row | None:
    return next((r for r in rows if r["scenario"] == scenario and r["rtt_ms"] == rtt
                 and r["workers"] == workers and r.get("msgs_per_s")), None)


def _ratio(a: Row | None, b: Row | None, key: str = "msgs_per_s") -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return float(a[key]) / float(b[key])


def _check(target: str, value: float | None, limit: float, fmt: Callable[[float], str]) -> Check:
    if value is None:
        return Check(target, "not measured", None)
    return Check(target, fmt(value), value >= limit)


def checks(doc: dict[str, Any]) -> list[Check]:
    s1: list[Row] = doc.get("scenarios", {}).get("throughput", [])
    s2: list[Row] = doc.get("scenarios", {}).get("scaling", [])
    s4: list[Row] = doc.get("scenarios", {}).get("enqueue", [])
    ours0 = _find(s1, OURS, 0.0)
    out = [
        _check("0 ms: dispatcher >= 1.4x baseline (b)", _ratio(ours0, _find(s1, BASE_B, 0.0)), 1.4,
               lambda v: f"{v:.2f}x"),
        _check("0 ms: dispatcher >= 5x baseline (a)", _ratio(ours0, _find(s1, BASE_A, 0.0)), 5.0,
               lambda v: f"{v:.2f}x"),
    ]
    for name, limit in ((OURS, 23.0), (OURS_CHUNKING, 45.0)):
        row = _find(s1, name, 20.0)
        steady = f" (steady {row['steady_msgs_per_s']:.1f})" if row and row.get("steady_msgs_per_s") else ""
        out.append(_check(f"20 ms, {'CHUNKING' if 'CHUNK' in name else 'PIPELINING'} sink: {name} "
                          f">= {limit:.0f} msg/s", row["msgs_per_s"] if row else None, limit,
                          lambda v, s=steady: f"{v:.1f} msg/s{s}"))
    for name in (OURS, OURS_CHUNKING):
        one, eight = _find(s2, name, 20.0, 1), _find(s2, name, 20.0, 8)
        steady = _ratio(eight, one, "steady_msgs_per_s")
        extra = f" (steady {steady:.2f}x)" if steady is not None else ""
        out.append(_check(f"8 workers >= 6x one worker: {name}", _ratio(eight, one), 6.0,
                          lambda v, e=extra: f"{v:.2f}x{e}"))
    bulk = [r for r in s4 if r["case"] in BULK and r.get("jobs_per_s")]
    best = max(bulk, key=lambda r: r["jobs_per_s"]) if bulk else None
    out.append(_check("bulk enqueue >= 8,000 mails/s", best["jobs_per_s"] if best else None, 8000.0,
                      lambda v, b=best: f"{v:,.0f}/s ({b['case'] if b else ''})"))
    for rtt in (0.0, 20.0):  # issue 8: throttling costs nothing measurable while the limit is not reached
        kept = _ratio(_find(s1, OURS_RATE, rtt), _find(s1, OURS, rtt), "steady_msgs_per_s")
        target = f"{rtt:.0f} ms: unreached route rate limit keeps >= 90% of the rate (issue 8)"
        out.append(_check(target, kept, 0.9, lambda v: f"{v * 100:.0f}% (steady)"))
    rss = [r["peak_rss_mb"] for r in s1 + s2 if r["scenario"].startswith(OURS) and r.get("peak_rss_mb")]
    worst = max(rss) if rss else None
    out.append(Check("worker peak RSS <= 60 MB", f"{worst:.1f} MB (max over dispatcher rows)" if worst
                     else "not measured", None if worst is None else worst <= 60.0))
    return out
