"""PNGs from a results file: ``python -m bench.plot [results.json]``.

``throughput.png`` — scenarios 1 and 2; ``grid.png`` — scenario 5 (issue 15's grid): msg/s against C at
each RTT per contender (median over rounds), and worker CPU ms per mail (net of start-up) at 0 ms.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.report import RESULTS_DIR


def plot(results: Path = RESULTS_DIR / "latest.json", out: Path | None = None) -> Path:
    doc: dict[str, Any] = json.loads(results.read_text())
    out = out or results.parent / "throughput.png"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))

    throughput = doc["scenarios"].get("throughput", [])
    names = list(dict.fromkeys(r["scenario"] for r in throughput))
    rtts = sorted({r["rtt_ms"] for r in throughput})
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [next((r["msgs_per_s"] or 0 for r in throughput
                        if r["scenario"] == name and r["rtt_ms"] == rtt), 0) for rtt in rtts]
        xs = [j + i * width for j in range(len(rtts))]
        bars = ax1.bar(xs, values, width, label=name)
        ax1.bar_label(bars, fmt="%.0f", fontsize=8)
    ax1.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(rtts))])
    ax1.set_xticklabels([f"{rtt:.0f} ms RTT" for rtt in rtts])
    ax1.set_ylabel("messages / s (1 worker, incl. start-up)")
    ax1.set_yscale("log")
    ax1.set_title("Scenario 1: end-to-end throughput")
    if names:
        ax1.legend(fontsize=7)

    scaling = doc["scenarios"].get("scaling", [])
    for name in dict.fromkeys(r["scenario"] for r in scaling):
        rows = sorted((r for r in scaling if r["scenario"] == name), key=lambda r: r["workers"])
        (line,) = ax2.plot([r["workers"] for r in rows], [r["msgs_per_s"] or 0 for r in rows], marker="o",
                           label=name)
        ax2.plot([r["workers"] for r in rows], [r.get("steady_msgs_per_s") or 0 for r in rows], marker=".",
                 linestyle=":", color=line.get_color(), alpha=0.7, label=f"{name} (steady)")
    workers = sorted({r["workers"] for r in scaling})
    if workers:
        # one connection per worker at one round trip per message: 1000 / RTT msg/s each
        rtt_ms = scaling[0]["rtt_ms"] or 1.0
        ax2.plot(workers, [w * 1000 / rtt_ms for w in workers], linestyle="--", color="grey",
                 label="limit: 1 RTT per message per connection")
    ax2.set_xscale("log", base=2)
    ax2.set_yscale("log")
    ax2.minorticks_off()
    ax2.set_xticks(workers, [str(w) for w in workers])
    ax2.set_xlabel("worker processes / concurrency")
    ax2.set_ylabel("messages / s")
    ax2.set_title(f"Scenario 2: scaling at {scaling[0]['rtt_ms']:.0f} ms RTT" if scaling else "Scenario 2")
    if scaling:
        ax2.legend(fontsize=7)
    ax2.grid(alpha=0.3)

    meta = doc.get("meta", {})
    fig.suptitle(f"dispatcher bench {doc.get('timestamp', '')} ({meta.get('mode', '?')}, "
                 f"{meta.get('cpu_count', '?')} cores, rq {meta.get('rq', '?')})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _median(values: list[float]) -> float | None:
    have = sorted(values)
    if not have:
        return None
    mid = len(have) // 2
    return have[mid] if len(have) % 2 else (have[mid - 1] + have[mid]) / 2


def plot_grid(results: Path = RESULTS_DIR / "latest.json", out: Path | None = None) -> Path:
    from bench.grid_report import SHORT_NAMES
    from bench.peers.contenders import PEER_ORDER

    doc: dict[str, Any] = json.loads(results.read_text())
    out = out or results.parent / "grid.png"
    rows = doc["scenarios"].get("peers", [])
    present = list(dict.fromkeys(r["scenario"] for r in rows))
    names = [n for n in PEER_ORDER if n in present] + [n for n in present if n not in PEER_ORDER]
    rtts = sorted({r["rtt_ms"] for r in rows})
    cs = sorted({r["workers"] for r in rows})

    def med(name: str, rtt: float, c: int, key: str) -> float | None:
        return _median([r[key] for r in rows if r["scenario"] == name and r["rtt_ms"] == rtt
                        and r["workers"] == c and r.get(key) is not None])

    fig, axes = plt.subplots(1, len(rtts) + 1, figsize=(4.2 * (len(rtts) + 1), 4.6), squeeze=False)
    for ax, rtt in zip(axes[0], rtts, strict=False):
        for name in names:
            points = [(c, v) for c in cs if (v := med(name, rtt, c, "msgs_per_s")) is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                        label=SHORT_NAMES.get(name, name))
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("C (concurrency / connections)")
        ax.set_ylabel("messages / s (drain, incl. start-up)")
        ax.set_title(f"{rtt:.0f} ms RTT")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    zero = rtts[0] if rtts else 0.0
    width = 0.8 / max(len(names), 1)
    for i, name in enumerate(names):
        values = [med(name, zero, c, "cpu_ms_per_msg_net") or 0.0 for c in cs]
        xs = [j + i * width for j in range(len(cs))]
        bars = ax.bar(xs, values, width, label=SHORT_NAMES.get(name, name))
        ax.bar_label(bars, fmt="%.1f", fontsize=6)
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cs))], [f"C={c}" for c in cs])
    ax.set_ylabel("worker CPU ms / mail (net of start-up)")
    ax.set_title(f"CPU per mail at {zero:.0f} ms RTT")
    ax.legend(fontsize=7)
    meta = doc.get("meta", {})
    rounds = meta.get("plan", {}).get("peer_rounds", "?")
    fig.suptitle(f"issue 15 grid, bench {doc.get('timestamp', '')} ({meta.get('mode', '?')}, {rounds} "
                 f"round(s), median; {meta.get('cpu_count', '?')} cores)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS_DIR / "latest.json"
    print(plot(source))
    if json.loads(source.read_text())["scenarios"].get("peers"):
        print(plot_grid(source))
