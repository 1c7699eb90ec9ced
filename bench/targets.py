"""The targets of issue 7 (and issue 8's "throttling costs nothing while the limit is not reached"),
checked against one results document (ratios from the same run).

Each check names the rows it used, so a reader can find them in the tables; a missing row (scenario
skipped, contender unavailable) gives ``met=None`` rather than a guess.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.peers.contenders import BULLMQ
from bench.scenarios import OURS_CONNS, OURS_SPREAD, RQ_ENQUEUE_MANY_NOOP

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


# --- issue 15: against BullMQ + Nodemailer, CPU, memory, Redis commands (scenarios 4 and 5) ----------------

RQ_NOOP = RQ_ENQUEUE_MANY_NOOP


def _med(rows: list[Row], scenario: str, rtt: float, workers: int, key: str) -> float | None:
    """Median of ``key`` over the rounds of one contender in one cell of scenario 5."""
    values = sorted(float(r[key]) for r in rows if r["scenario"] == scenario and r["rtt_ms"] == rtt
                    and r["workers"] == workers and r.get(key) is not None)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def _over(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _ours_vs_bullmq(s5: list[Row], rtt: float, workers: int, limit: float) -> Check:
    """Our best layout at this cell (C processes, 1 process x C connections, or one process per core with
    C/P connections each) / BullMQ."""
    bull = _med(s5, BULLMQ, rtt, workers, "msgs_per_s")
    mine = {"C processes": _over(_med(s5, OURS, rtt, workers, "msgs_per_s"), bull)}
    if workers > 1:
        mine["1 process x C conns"] = _over(_med(s5, OURS_CONNS, rtt, workers, "msgs_per_s"), bull)
        mine["P processes x C/P conns"] = _over(_med(s5, OURS_SPREAD, rtt, workers, "msgs_per_s"), bull)
    have = {k: v for k, v in mine.items() if v is not None}
    target = f"{rtt:.0f} ms, C={workers}: dispatcher >= {limit:.1f}x BullMQ+Nodemailer"
    if not have:
        return Check(target, "not measured", None)
    best = max(have.values())
    detail = ", ".join(f"{k} {v:.2f}x" for k, v in have.items())
    return Check(target, f"{best:.2f}x ({detail})" if len(have) > 1 else f"{best:.2f}x", best >= limit)


def _cpu_check(s5: list[Row], scenario: str, workers: int, limit: float, label: str) -> Check:
    net = _med(s5, scenario, 0.0, workers, "cpu_ms_per_msg_net")
    gross = _med(s5, scenario, 0.0, workers, "cpu_ms_per_msg")
    target = f"0 ms, C={workers}{label}: worker CPU per mail <= {limit} ms (net of start-up)"
    if net is None:
        return Check(target, "not measured", None)
    return Check(target, f"{net:.2f} ms (gross {gross:.2f})" if gross is not None else f"{net:.2f} ms",
                 net <= limit)


def _pss_check(s5: list[Row]) -> Check:
    """16 connections in total: the worst cell (any RTT) of each of our two ways to have them."""
    found = {}
    for name, label in ((OURS_CONNS, "1 process x 16"), (OURS_SPREAD, "P processes x 16/P"),
                        (OURS, "16 processes")):
        values = [v for rtt in sorted({r["rtt_ms"] for r in s5})
                  if (v := _med(s5, name, rtt, 16, "peak_pss_mb")) is not None]
        if values:
            found[label] = max(values)
    target = "16 connections <= 120 MB PSS (summed over the worker processes)"
    if not found:
        return Check(target, "not measured", None)
    detail = ", ".join(f"{k}: {v:.0f} MB" for k, v in found.items())
    return Check(target, detail, min(found.values()) <= 120.0)


def _commands_check(commands: list[Row]) -> Check:
    mine = [c for c in commands if c["scenario"] in (OURS, OURS_CONNS) and c.get("total_per_mail")]
    target = "Redis commands per delivered mail <= 15 (client + inside Lua)"
    if not mine:
        return Check(target, "not measured", None)
    worst = max(mine, key=lambda c: c["total_per_mail"])
    detail = "; ".join(f"{'1x' if c['scenario'] == OURS_CONNS else ''}C={c['workers']}: "
                       f"{c['client_per_mail']:.1f}+{c['lua_per_mail']:.1f}" for c in mine)
    return Check(target, f"{worst['total_per_mail']:.1f} worst ({detail})", worst["total_per_mail"] <= 15.0)


def issue15_checks(doc: dict[str, Any]) -> list[Check]:
    sc = doc.get("scenarios", {})
    s5: list[Row] = sc.get("peers", [])
    s4: list[Row] = sc.get("enqueue", [])
    out = [_cpu_check(s5, OURS, 1, 1.2, ""), _cpu_check(s5, OURS, 16, 1.4, " (16 processes)"),
           _cpu_check(s5, OURS_CONNS, 16, 1.4, " (1 process x 16 connections)"),
           _cpu_check(s5, OURS_SPREAD, 16, 1.4, " (P processes x 16/P connections)")]
    out += [_ours_vs_bullmq(s5, 0.0, c, 1.0) for c in (1, 4, 16)]
    out += [_ours_vs_bullmq(s5, rtt, c, 1.5) for rtt in (20.0, 100.0) for c in (1, 4, 16)]
    out.append(_pss_check(s5))
    one = _over(_med(s5, OURS_CONNS, 100.0, 16, "msgs_per_s"), _med(s5, OURS, 100.0, 16, "msgs_per_s"))
    out.append(_check("100 ms: 1 process x 16 connections >= 80% of 16 processes", one, 0.8,
                      lambda v: f"{v * 100:.0f}%"))
    out.append(_commands_check(sc.get("commands", [])))
    bulk = [r for r in s4 if r["case"] in BULK and r.get("jobs_per_s")]
    best = max(bulk, key=lambda r: r["jobs_per_s"]) if bulk else None
    noop = next((r for r in s4 if r["case"] == RQ_NOOP and r.get("jobs_per_s")), None)
    out.append(_check("bulk enqueue >= rq's enqueue_many of no-op jobs",
                      _over(best["jobs_per_s"], noop["jobs_per_s"]) if best and noop else None, 1.0,
                      lambda v, b=best, q=noop: f"{v:.2f}x ({b['jobs_per_s'] if b else 0:,.0f}/s vs "
                                                f"{q['jobs_per_s'] if q else 0:,.0f}/s)"))
    return out
